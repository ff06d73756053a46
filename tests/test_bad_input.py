"""The bad-input catalogue: malformed configs, checkpoints, URLs and images, each given to
the real command line. Every case exits 2 with a message naming the culprit (the field,
the file or the URL) and writes nothing, or, where the design converts or skips, exits 0
and reports what it converted or skipped.

Cases already covered elsewhere are not repeated here: test_cli.py (unknown synthesizer,
architecture, key, missing and zero-byte checkpoint, ResNet-56 weights for a ResNet-20,
num_classes and image_size mismatches, zero sizes, an output that is a file, /proc,
an unknown scheme for run.output), test_config.py, test_images.py, test_metadata.py,
test_retrieval.py, test_evaluation_training.py, test_s3.py and test_submit.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tests_support import config_dict

from pipeline.cli.main import main
from pipeline.models.archs import build_architecture

REPO = Path(__file__).resolve().parents[1]
CC = {"name": "class-conditional", "iterations": 2}
IMPRESSION = {"name": "impression", "iterations": 2}


@dataclass
class Env:
    """What a case builds its input in: a private folder, the tiny teacher, the fixture
    request (for the S3 server, started only by the cases that need it)."""

    root: Path
    checkpoint: str
    request: pytest.FixtureRequest
    marker: Path = field(init=False)

    def __post_init__(self) -> None:
        self.marker = self.root.parent / f"{self.root.name}-pwned"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def s3(self) -> Any:
        return self.request.getfixturevalue("s3_server")

    def config(self, *, name: str = "config.yaml", **sections: dict[str, Any]) -> str:
        path = self.root / name
        path.write_text(yaml.safe_dump(config_dict(str(self.out), self.checkpoint, **sections)))
        return str(path)

    def text(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)


# --- images ---------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncated_jpeg() -> bytes:
    data = encoded(noise(99, 64), "JPEG")
    return data[: len(data) // 2]


_BOMB: list[bytes] = []


def bomb() -> bytes:
    """A 20,000 x 20,000 one-bit PNG: a few kB on disk, 400 megapixels decoded (above
    PIL's decompression-bomb limit, twice ``Image.MAX_IMAGE_PIXELS``)."""
    if not _BOMB:
        _BOMB.append(encoded(Image.new("1", (20_000, 20_000))))
    return _BOMB[0]


BAD_IMAGES: dict[str, Callable[[], bytes]] = {
    "truncated": truncated_jpeg,
    "zero-byte": lambda: b"",
    "not-an-image": lambda: b"name,label\nthis is a csv file,3\n",
    "bomb": bomb,
}
BAD_MESSAGES = {
    "truncated": "not a readable image",
    "zero-byte": "empty image file",
    "not-an-image": "not a readable image",
    "bomb": "too large .*decompression bomb",
}


def odd_modes() -> dict[str, bytes]:
    """Images in modes other than 8-bit RGB, all meant to be converted to RGB."""
    grey16 = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))
    palette = Image.new("P", (32, 32))
    palette.putpalette([255, 0, 0] * 256)
    return {
        "cmyk.jpg": encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"),
        "palette.png": encoded(palette),
        "grey16.png": encoded(grey16),
        "grey.png": encoded(Image.new("L", (32, 32), 128)),
        "rgba.png": encoded(Image.new("RGBA", (32, 32), (0, 0, 255, 128))),
    }


def class_folders(root: Path, classes: int = 10, per_class: int = 1) -> Path:
    for c in range(classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise(c * 100 + i).save(root / str(c) / f"{i}.png")
    return root


# --- the cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    setup: Callable[[Env], list[str]]  # returns the command line
    message: str  # a regex the error (or, for code 0, the output) must match
    code: int = 2
    check: Callable[[Env, str], None] | None = None  # extra checks on a code-0 case


def config_case(**sections: Any) -> Callable[[Env], list[str]]:
    return lambda env: ["run", env.config(**sections)]


def raw_config(text: str | bytes) -> Callable[[Env], list[str]]:
    return lambda env: ["run", env.text("config.yaml", text)]


def override(*items: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        args = ["run", env.config()]
        for item in items:
            args += ["--set", item]
        return args

    return setup


class Exploit:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_case(make: Callable[[Env, Path], None], **sections: Any) -> Callable:
    def setup(env: Env) -> list[str]:
        path = env.root / "bad.pt"
        make(env, path)
        teacher = {"checkpoint": str(path), **sections.pop("teacher", {})}
        return ["run", env.config(teacher=teacher, **sections)]

    return setup


def truncate(env: Env, path: Path) -> None:
    data = Path(env.checkpoint).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def torch_exploit(env: Env, path: Path) -> None:
    torch.save({"state_dict": {}, "payload": Exploit(env.marker)}, path)


def plain_exploit(env: Env, path: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": Exploit(env.marker)}))


def tensor_only(env: Env, path: Path) -> None:
    torch.save(torch.zeros(3), path)


def vgg_weights(env: Env, path: Path) -> None:
    torch.save(build_architecture("vgg11_bn_cifar", 10).state_dict(), path)


def folder_as_checkpoint(env: Env) -> list[str]:
    (env.root / "weights.pt").mkdir()
    return ["run", env.config(teacher={"checkpoint": str(env.root / "weights.pt")})]


def verifier_exploit(env: Env) -> list[str]:
    path = env.root / "verifier.pt"
    torch_exploit(env, path)
    verifier = {"arch": "resnet20", "checkpoint": str(path)}
    return ["run", env.config(filter={"enabled": True, "verifier": verifier})]


def s3_output(bucket: str | None, **options: Any) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        server = env.s3()
        name = bucket or server.make_bucket("catalogue")
        storage = {**server.storage_options(), **options}
        run = {"output": f"s3://{name}/runs", "storage_options": storage}
        return ["run", env.config(run=run)]

    return setup


def unreachable_endpoint(env: Env) -> list[str]:
    from seaweed import free_port

    storage = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"}
    return ["run", env.config(run={"output": "s3://quiet/runs", "storage_options": storage})]


def s3_missing_checkpoint(env: Env) -> list[str]:
    server = env.s3()
    bucket = server.make_bucket("ckpt")
    run = {"output": f"s3://{bucket}/runs", "storage_options": server.storage_options()}
    teacher = {"checkpoint": f"s3://{bucket}/teachers/missing.pt"}
    return ["run", env.config(run=run, teacher=teacher)]


def metadata_with(kind: str) -> Callable[[Env], list[str]]:
    """Scenario A class folders with one bad file in class 3 (``dreamshard metadata``)."""

    def setup(env: Env) -> list[str]:
        source = class_folders(env.root / "train")
        (source / "3" / "broken.jpg").write_bytes(BAD_IMAGES[kind]())
        return ["metadata", env.config(synthesizer=CC, metadata={"source": str(source)})]

    return setup


def teacher_eval_with(kind: str) -> Callable[[Env], list[str]]:
    """A test set (class folders) with one bad file (``dreamshard teacher eval``)."""

    def setup(env: Env) -> list[str]:
        data = class_folders(env.root / "test", classes=3)
        (data / "1" / "odd.png").write_bytes(BAD_IMAGES[kind]())
        return ["teacher", "eval", "--checkpoint", env.checkpoint, "--data", str(data)]

    return setup


def teacher_eval_modes(env: Env) -> list[str]:
    data = class_folders(env.root / "test", classes=2)
    for name, data_bytes in odd_modes().items():
        (data / "1" / name).write_bytes(data_bytes)
    return ["teacher", "eval", "--checkpoint", env.checkpoint, "--data", str(data)]


def seeds_with_modes(env: Env) -> list[str]:
    seeds = env.root / "seeds"
    seeds.mkdir()
    for name, data in odd_modes().items():
        (seeds / name).write_bytes(data)
    metadata = {"source": str(seeds), "scenario": "seeds"}
    return ["metadata", env.config(synthesizer=CC, metadata=metadata)]


def eval_test_set_with_bomb(env: Env) -> list[str]:
    from evaluation_support import write_shards

    shards = write_shards(env.root / "shards-run", per_class=1, shard_size=10)
    test = class_folders(env.root / "test")
    (test / "5" / "huge.png").write_bytes(bomb())
    config = {
        "run": {"name": "bad", "output": str(env.out)},
        "data": {"shards": str(shards), "test": str(test)},
        "teacher": {"arch": "resnet20", "checkpoint": env.checkpoint},
        "student": {"arch": "resnet20"},
    }
    return ["eval", "kd", env.text("eval.yaml", yaml.safe_dump(config))]


def pool_with_every_bad_kind(env: Env) -> list[str]:
    from test_retrieval import labeled_folder

    pool = env.root / "pool"
    pool.mkdir()
    for i in range(4):
        noise(500 + i).save(pool / f"good{i}.png")
    for kind, make in BAD_IMAGES.items():
        (pool / f"{kind}.png").write_bytes(make())
    labeled = labeled_folder(env.root / "labeled")
    retrieval = {"pool": str(pool), "labeled": str(labeled), "num_select": 2}
    return ["retrieve", env.config(synthesizer=IMPRESSION, retrieval=retrieval)]


def translation_with_bad_sources(env: Env) -> list[str]:
    source, target = env.root / "source", env.root / "target"
    source.mkdir()
    target.mkdir()
    noise(1).save(source / "ok.png")
    for kind, make in BAD_IMAGES.items():
        (source / f"{kind}.jpg").write_bytes(make())
    for i in range(2):
        noise(10 + i).save(target / f"{i}.png")
    translation = {"source": str(source), "target": str(target)}
    plan = {"batch_size": 4, "shard_size": 4}
    return ["translate", env.config(synthesizer=IMPRESSION, translation=translation, plan=plan)]


def translation_all_unreadable(env: Env) -> list[str]:
    source, target = env.root / "source", env.root / "target"
    target.mkdir(parents=True)
    noise(3).save(target / "0.png")
    source.mkdir()
    for kind in ("zero-byte", "truncated"):
        (source / f"{kind}.jpg").write_bytes(BAD_IMAGES[kind]())
    translation = {"source": str(source), "target": str(target)}
    return ["translate", env.config(synthesizer=IMPRESSION, translation=translation)]


def read_only_output(env: Env) -> list[str]:
    locked = env.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return ["run", env.config(run={"output": str(locked / "out")})]


def lease_with(content: str) -> Callable[[Env], list[str]]:
    """A run folder whose ``lease.json`` holds ``content`` (not a lease)."""

    def setup(env: Env) -> list[str]:
        env.text("out/test/lease.json", content)
        return ["run", env.config()]

    return setup


def repair_without_record(env: Env) -> list[str]:
    """``inspect --repair`` on a folder with a shard but no ``run.json``."""
    env.text("out/test/shards/train-000000.json", "{}")
    return ["inspect", "--verify", "--repair", str(env.out / "test")]


def expect_counts(**counts: int) -> Callable[[Env, str], None]:
    """A code-0 case: the stage's manifest (named by the printed output) counts skips."""

    def check(env: Env, out: str) -> None:
        manifest = re.search(r"manifest: (\S+\.json)", out).group(1)
        totals = json.loads(Path(manifest).read_text())["totals"]
        for name, value in counts.items():
            assert totals[name] == value, (name, totals)

    return check


def expect_images(count: int) -> Callable[[Env, str], None]:
    def check(env: Env, out: str) -> None:
        assert json.loads(out)["images"] == count

    return check


def expect_used(count: int) -> Callable[[Env, str], None]:
    def check(env: Env, out: str) -> None:
        printed = json.loads(out)
        assert printed["used"] == printed["images"] == count and printed["dropped"] == {}

    return check


CASES = [
    # configs
    Case("yaml-empty", "an empty config file", raw_config(""), r"teacher: checkpoint is required"),
    Case(
        "yaml-undecodable",
        "a config file that is not UTF-8 text",
        raw_config(b"run:\n  name: \xff\xfe\x00bad\n"),
        r"config .*config\.yaml: not UTF-8 text",
    ),
    Case(
        "yaml-tabs",
        "YAML that does not parse (a tab indent)",
        raw_config("run:\n\tname: x\n"),
        r"config .*config\.yaml: not valid YAML",
    ),
    Case(
        "section-is-list",
        "a section given as a list",
        raw_config("teacher: {checkpoint: t.pt}\nplan: [1, 2]\n"),
        r"plan: expected a mapping of fields, got list",
    ),
    Case(
        "section-is-scalar",
        "the synthesizer section given as a string",
        raw_config("teacher: {checkpoint: t.pt}\nsynthesizer: deepinversion\n"),
        r"synthesizer: expected a mapping of fields, got str",
    ),
    Case(
        "wrong-type-int",
        "an integer field given a word",
        config_case(synthesizer={"name": "deepinversion", "iterations": "many"}),
        r"synthesizer\.iterations: expected an integer, got 'many'",
    ),
    Case(
        "wrong-type-bool",
        "a boolean field given the string 'yes'",
        config_case(filter={"enabled": "yes"}),
        r"filter\.enabled: expected true or false, got 'yes'",
    ),
    Case(
        "wrong-type-list",
        "a list field given a number",
        config_case(teacher={"mean": 0.5}),
        r"teacher\.mean: expected a list, got 0\.5",
    ),
    Case(
        "unknown-key-nested",
        "an unknown key in the verifier subsection",
        config_case(filter={"verifier": {"arch": "resnet20", "checkpoint": "v.pt", "depth": 3}}),
        r"unknown key filter\.verifier\.depth",
    ),
    Case(
        "unknown-key-override",
        "--set of a field that does not exist",
        override("runtime.gpus=2"),
        r"unknown key runtime\.gpus",
    ),
    Case(
        "override-into-scalar",
        "--set through a field that is not a section",
        override("run.seed.value=3"),
        r"--set 'run\.seed\.value=3': seed is not a section",
    ),
    Case(
        "negative-shard-size",
        "a negative shard size",
        override("plan.shard_size=-4"),
        r"shard_size must be positive, got -4",
    ),
    Case(
        "negative-class",
        "a negative class index",
        config_case(plan={"classes": [0, -1]}),
        r"plan\.classes: \[-1\] outside the teacher's 10 classes",
    ),
    Case(
        "duplicate-classes",
        "a class listed twice",
        config_case(plan={"classes": [2, 2]}),
        r"classes has duplicates: \[2, 2\]",
    ),
    Case(
        "bad-enum-precision",
        "an unknown precision",
        config_case(synthesizer={"name": "deepinversion", "precision": "fp8"}),
        r"precision.*fp8",
    ),
    Case(
        "bad-enum-scenario",
        "an unknown metadata scenario",
        config_case(synthesizer=CC, metadata={"source": "x", "scenario": "D"}),
        r"scenario must be one of A, B, C, seeds, got 'D'",
    ),
    Case(
        "conflict-source-artifact",
        "metadata source and artifact both given",
        config_case(synthesizer=CC, metadata={"source": "a", "artifact": "b.safetensors"}),
        r"metadata: give either source or artifact, not both",
    ),
    Case(
        "conflict-variations",
        "metadata.variations outside the seeds scenario",
        config_case(synthesizer=CC, metadata={"source": "a", "variations": 4}),
        r"variations applies to scenario seeds only",
    ),
    Case(
        "run-name-with-slash",
        "a run name that would escape the output folder",
        config_case(run={"name": "../elsewhere"}),
        r"run: name must be non-empty and contain no '/'",
    ),
    Case(
        "synthesizer-without-name",
        "a synthesizer section without a name",
        raw_config("synthesizer: {iterations: 2}\nteacher: {checkpoint: t.pt}\n"),
        r"synthesizer\.name is required; valid names: .*deepinversion",
    ),
    # checkpoints
    Case(
        "ckpt-truncated",
        "a real checkpoint cut to two thirds",
        checkpoint_case(truncate),
        r"bad\.pt is not a readable PyTorch checkpoint",
    ),
    Case(
        "ckpt-pickle-exploit-torch",
        "a torch.save file whose pickle runs a shell command",
        checkpoint_case(torch_exploit),
        r"bad\.pt was refused: .*weights_only=True",
    ),
    Case(
        "ckpt-pickle-exploit-raw",
        "a bare pickle (no torch zip) that runs a shell command",
        checkpoint_case(plain_exploit),
        r"bad\.pt (was refused|is not a readable PyTorch checkpoint)",
    ),
    Case(
        "ckpt-not-a-dict",
        "a checkpoint holding a bare tensor",
        checkpoint_case(tensor_only),
        r"bad\.pt holds a Tensor, not a state dict",
    ),
    Case(
        "ckpt-wrong-arch-family",
        "VGG weights for a ResNet teacher",
        checkpoint_case(vgg_weights),
        r"does not fit architecture 'resnet20': .*missing keys",
    ),
    Case(
        "ckpt-meta-arch",
        "a dreamshard ResNet-20 checkpoint declared as a ResNet-32",
        config_case(teacher={"arch": "resnet32"}),
        r"teacher\.arch is 'resnet32' but the checkpoint was trained with arch='resnet20'",
    ),
    Case(
        "ckpt-is-folder",
        "a checkpoint path that is a folder",
        folder_as_checkpoint,
        r"weights\.pt (cannot be read|does not exist|is not a file)",
    ),
    Case(
        "ckpt-verifier-exploit",
        "a malicious pickle as the filter's verifier",
        verifier_exploit,
        r"filter\.verifier: .*verifier\.pt was refused",
    ),
    # URLs
    Case(
        "url-unknown-scheme-checkpoint",
        "a checkpoint URL with an unknown scheme",
        config_case(teacher={"checkpoint": "gopher://models/t.pt"}),
        r"gopher://models/t\.pt: unsupported storage URL",
    ),
    Case(
        "url-missing-bucket",
        "an S3 output bucket that does not exist",
        s3_output("no-such-bucket-here"),
        r"run\.output: bucket 'no-such-bucket-here' does not exist",
    ),
    Case(
        "url-wrong-credentials",
        "S3 credentials the server does not know",
        s3_output(None, key="AKIAWRONGKEY", secret="wrong-secret-value"),
        r"run\.output: no permission to list bucket 'catalogue-",
    ),
    Case(
        "url-unreachable-endpoint",
        "an S3 endpoint where nothing listens",
        unreachable_endpoint,
        r"run\.output: S3 endpoint http://127\.0\.0\.1:\d+ did not answer for bucket 'quiet'",
    ),
    Case(
        "url-missing-s3-checkpoint",
        "a teacher checkpoint URL in S3 that does not exist",
        s3_missing_checkpoint,
        r"teacher\.checkpoint: s3://ckpt-\w+/teachers/missing\.pt does not exist",
    ),
    Case(
        "url-output-not-writable",
        "a local output folder without write permission",
        read_only_output,
        r"run\.output: .*locked is not writable",
    ),
    # images: metadata sources (refused), test sets (refused or converted),
    # retrieval pools and translation sources (skipped and counted)
    *[
        Case(
            f"metadata-{kind}",
            f"a {kind} image in a metadata source",
            metadata_with(kind),
            rf"train/3/broken\.jpg: {BAD_MESSAGES[kind]}",
        )
        for kind in BAD_IMAGES
    ],
    Case(
        "test-set-zero-byte",
        "a zero-byte image in a teacher-eval test set",
        teacher_eval_with("zero-byte"),
        r"test/1/odd\.png: empty image file",
    ),
    Case(
        "test-set-not-an-image",
        "a text file named .png in a teacher-eval test set",
        teacher_eval_with("not-an-image"),
        r"test/1/odd\.png: not a readable image",
    ),
    Case(
        "eval-test-set-bomb",
        "a decompression bomb in dreamshard eval's test set",
        eval_test_set_with_bomb,
        r"test/5/huge\.png: too large .*400000000 pixels",
    ),
    Case(
        "test-set-odd-modes",
        "CMYK, palette, 16-bit, grey and RGBA images in a test set: converted to RGB",
        teacher_eval_modes,
        r'"images": 7',
        code=0,
        check=expect_images(7),
    ),
    Case(
        "seeds-odd-modes",
        "seed images in CMYK, palette, 16-bit, grey and RGBA: converted, one row each",
        seeds_with_modes,
        r'"used": 5',
        code=0,
        check=expect_used(5),
    ),
    Case(
        "pool-bad-images-skipped",
        "a retrieval pool with a truncated, a zero-byte, a non-image and a bomb file",
        pool_with_every_bad_kind,
        r"wrote 2 images",
        code=0,
        check=expect_counts(pool_skipped=4, pool_scored=4),
    ),
    Case(
        "translation-bad-sources-skipped",
        "translation sources with every bad kind next to one good image",
        translation_with_bad_sources,
        r"wrote 1 images",
        code=0,
        check=expect_counts(source_skipped=4),
    ),
    Case(
        "translation-no-readable-source",
        "translation sources of which none is readable",
        translation_all_unreadable,
        r"translation\.source: .*source holds no readable image",
    ),
    Case(
        "lease-garbage-json",
        "a run whose lease.json is not JSON",
        lease_with("{not a lease"),
        r"out/test/lease\.json: not a dreamshard lease",
    ),
    Case(
        "lease-wrong-fields",
        "a run whose lease.json is JSON without a lease's fields",
        lease_with('{"kind": "dreamshard-lease", "host": 3}'),
        r"out/test/lease\.json: not a dreamshard lease \(no valid 'host'\)",
    ),
    Case(
        "repair-without-run-json",
        "inspect --repair on a folder without run.json",
        repair_without_record,
        r"out/test: not a dreamshard run \(no run\.json\); nothing to repair",
    ),
]


S3_SETUPS = {c.setup for c in CASES if c.id in ("url-missing-bucket", "url-wrong-credentials")}
S3_SETUPS |= {s3_missing_checkpoint}


def snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` and its size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_without_override(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI as a process that file modes apply to: as root (where chmod denies
    nothing), without the capabilities that override them (``setpriv``)."""
    command = [sys.executable, "-m", "pipeline.cli", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a folder's mode cannot deny root")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--", *command]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(
    case: Case, tmp_path: Path, teacher_checkpoint: str, request, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path a case forgets would land here, and be seen
    env = Env(tmp_path / "case", teacher_checkpoint, request)
    env.root.mkdir()
    args = case.setup(env)
    before = snapshot(tmp_path)
    buckets = env.s3().buckets() if "s3_server" in request.fixturenames else None
    assert (buckets is not None) == (case.setup in S3_SETUPS)  # S3 cases check the bucket
    if case.id == "url-output-not-writable":
        code, out, err = run_without_override(args)
    else:
        code, out, err = run_cli(args, capsys)
    assert code == case.code, err[-2000:]
    if case.code == 2:
        assert err.startswith("dreamshard: error: "), err[-2000:]
        assert re.search(case.message, err), err
        assert "Traceback" not in err
        assert snapshot(tmp_path) == before  # nothing written, nothing left half-written
        if buckets is not None:
            fs = env.s3().filesystem()
            assert env.s3().buckets() == buckets
            assert all(not fs.find(bucket) for bucket in buckets if bucket.startswith("catalogue"))
    else:
        assert re.search(case.message, out), out
        case.check(env, out)
    assert not env.marker.exists(), "a checkpoint's pickle ran code"


def test_the_catalogue_holds_at_least_25_distinct_cases() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 25
    assert len({case.what for case in CASES}) == len(CASES)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    from pipeline.io.images import decode

    values = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # 0 … 61,380
    rgb = decode(encoded(Image.fromarray(values)), "grey16.png")
    assert rgb.shape == (32, 32, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.array_equal(rgb[..., 0], (values >> 8).astype(np.uint8))  # not 255 from 256 up
