"""Architectures, checkpoints and the shared pretrained CIFAR-10 teachers."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import CIFAR_TAR, RESNET20, RESNET56, shared

from pipeline.config import TeacherConfig
from pipeline.errors import InputError
from pipeline.io.images import open_image_folder
from pipeline.models.accuracy import classifier_accuracy
from pipeline.models.archs import ARCHITECTURES, build_architecture
from pipeline.models.teachers import load_checkpoint, load_teacher


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_cifar_architecture_builds_and_runs(name: str) -> None:
    model = build_architecture(name, 7).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_models_by_name_and_unknown_names_list_the_valid_ones() -> None:
    model = build_architecture("torchvision:resnet18", 5).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(InputError, match="valid names: resnet20"):
        build_architecture("resnet21", 10)
    with pytest.raises(InputError, match="resnet50"):
        build_architecture("torchvision:resnet51", 10)


def test_cifar_resnet_depths_have_the_published_parameter_counts() -> None:
    counts = {
        n: sum(p.numel() for p in build_architecture(n, 10).parameters())
        for n in ("resnet20", "resnet56", "resnet110")
    }
    # He et al. 2016, Table 6: 0.27M, 0.85M, 1.7M
    assert round(counts["resnet20"] / 1e6, 2) == 0.27
    assert round(counts["resnet56"] / 1e6, 2) == 0.85
    assert round(counts["resnet110"] / 1e6, 1) == 1.7


@pytest.mark.parametrize(
    ("arch", "path", "measured"), [("resnet20", RESNET20, 0.804), ("resnet56", RESNET56, 0.825)]
)
def test_shared_checkpoints_load_strictly_and_score(arch: str, path: Path, measured: float) -> None:
    config = TeacherConfig(arch=arch, checkpoint=str(shared(path)))
    teacher = load_teacher(config)
    folder = open_image_folder(f"{shared(CIFAR_TAR)}/cifar10-jpeg/test").subset(100)
    images, labels = folder.load()
    assert images.shape == (1000, 3, 32, 32) and labels.bincount().tolist() == [100] * 10
    result = classifier_accuracy(teacher.model, images, labels, config.mean, config.std, 10)
    assert result["accuracy"] >= 0.75
    assert result["accuracy"] == pytest.approx(measured, abs=0.01)


def wrapped_checkpoint(tmp_path: Path, state: dict, name: str = "c.pt") -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_wrappers_and_module_prefix_are_accepted(tmp_path: Path) -> None:
    model = build_architecture("resnet20", 10)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    url = wrapped_checkpoint(tmp_path, {"state_dict": state, "best_prec1": 90.0})
    teacher = load_teacher(TeacherConfig(checkpoint=url))
    for key, value in model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[key], value)
    assert len(teacher.digest) == 64


def test_checkpoints_load_from_fsspec_urls(tmp_path: Path) -> None:
    import fsspec

    model = build_architecture("resnet20", 10)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with fsspec.open("memory://teachers/r20.pt", "wb") as f:
        f.write(buffer.getvalue())
    state, _, _ = load_checkpoint("memory://teachers/r20.pt")
    assert set(state) == set(model.state_dict())


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "not a readable PyTorch checkpoint"),
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "not a readable PyTorch checkpoint"),
        (lambda p: p.write_bytes(pickle.dumps({"x": Exploit()})), "refused|not a readable"),
    ],
)
def test_unreadable_or_malicious_checkpoints_are_refused(
    tmp_path: Path, make, message: str
) -> None:
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(InputError, match=message):
        load_teacher(TeacherConfig(checkpoint=str(path)))


def test_malicious_pickle_inside_a_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Exploit()}, path)
    with pytest.raises(InputError, match="weights_only"):
        load_teacher(TeacherConfig(checkpoint=str(path)))


def test_truncated_real_checkpoint_is_refused(tmp_path: Path) -> None:
    model = build_architecture("resnet20", 10)
    full = tmp_path / "full.pt"
    torch.save(model.state_dict(), full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InputError, match="not a readable"):
        load_teacher(TeacherConfig(checkpoint=str(cut)))


def test_mismatches_name_keys_classes_and_image_size(
    tmp_path: Path, teacher_checkpoint: str
) -> None:
    r56 = wrapped_checkpoint(tmp_path, build_architecture("resnet56", 10).state_dict())
    with pytest.raises(InputError, match=r"missing keys .*unexpected keys .*layer1\.3"):
        load_teacher(TeacherConfig(arch="resnet20", checkpoint=r56))
    bare = wrapped_checkpoint(tmp_path, build_architecture("resnet20", 10).state_dict(), "b.pt")
    with pytest.raises(InputError, match="num_classes is 100 .*classifier 'linear' has 10"):
        load_teacher(TeacherConfig(checkpoint=bare, num_classes=100))
    with pytest.raises(InputError, match="num_classes is 100 .* num_classes=10"):
        load_teacher(TeacherConfig(checkpoint=teacher_checkpoint, num_classes=100))
    with pytest.raises(InputError, match="image_size is 64 .* image_size=32"):
        load_teacher(TeacherConfig(checkpoint=teacher_checkpoint, image_size=64))
    with pytest.raises(InputError, match="arch is 'resnet32'"):
        load_teacher(TeacherConfig(arch="resnet32", checkpoint=teacher_checkpoint))
