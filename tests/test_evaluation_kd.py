"""Where the KD targets come from (no Ray): stored logits only for the image the student
sees; a stored-logits run on shards without logits.npy is bad input naming the shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from evaluation_support import write_sized_shards, write_test_folder

from evaluation.config import parse_eval_config
from evaluation.inputs import prepare
from evaluation.kd import kd_targets, student_job
from evaluation.loader import ShardDataset, resolve_shards
from pipeline.cli.main import main
from pipeline.errors import InputError
from pipeline.models.archs import build_architecture


def config_for(tmp_path: Path, checkpoint: str, shards: Path, **data: Any) -> dict[str, Any]:
    test = tmp_path / "test"
    if not test.exists():
        write_test_folder(test, per_class=1)
    return {
        "run": {"name": "kd", "output": str(tmp_path / "eval")},
        "data": {"shards": str(shards), "test": str(test), **data},
        "teacher": {"arch": "resnet20", "checkpoint": checkpoint},
        "train": {"logits": "stored"},
    }


def view_job(tmp_path: Path, checkpoint: str, **view: float) -> tuple[Any, Any]:
    """A stored-logits KD config over small shards with augmentation off and ``view`` (a
    data field making new images), and the student job it gives."""
    shards = write_sized_shards(tmp_path / "run", [6, 4])
    config = parse_eval_config(config_for(tmp_path, checkpoint, shards, augment=False, **view))
    return config, student_job(prepare(config, "kd"), build_architecture("resnet20", 10), "kd")


@pytest.mark.parametrize("augment", [True, False], ids=["augmented", "plain"])
def test_stored_logits_teach_only_the_unaugmented_image(
    teacher_checkpoint: str, tmp_path: Path, augment: bool
) -> None:
    shards = write_sized_shards(tmp_path / "run", [6, 4])
    config = parse_eval_config(config_for(tmp_path, teacher_checkpoint, shards, augment=augment))
    inputs = prepare(config, "kd")
    job = student_job(inputs, build_architecture("resnet20", 10), "kd")
    if augment:  # the teacher runs on each augmented view; logits.npy is not read
        assert job.teacher is not None and not job.stored_logits and job.augment
        assert kd_targets(config, "kd").startswith("teacher run on each augmented view")
        teacher = job.teacher.eval()
        images, _ = next(
            iter(ShardDataset(job.shards, job.mean, job.std, augment=True, batch_size=4))
        )
        with torch.no_grad():
            assert torch.equal(teacher(images), inputs.teacher.model.eval()(images))
    else:  # the student sees the stored image: the stored logits are its targets
        assert job.teacher is None and job.stored_logits and not job.augment
        assert kd_targets(config, "kd") == "stored logits.npy (images unaugmented)"
    with pytest.raises(ValueError, match="stored logits describe the stored image"):
        ShardDataset(
            resolve_shards(str(shards)).shards, (0,) * 3, (1,) * 3, logits=True, augment=True
        )


def test_mixup_makes_new_images_so_the_teacher_labels_them(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    from evaluation.training import kd_loss
    from evaluation.views import mix

    config, job = view_job(tmp_path, teacher_checkpoint, mixup=0.4)
    assert job.teacher is not None and not job.stored_logits and job.mixup == 0.4
    assert kd_targets(config, "kd").startswith("teacher run on each mixed")

    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 4, 4), torch.arange(8)
    assert mix(images, labels, 0.0) == (images, None)
    mixed, (other, lam) = mix(images, labels, 0.4)
    assert 0.0 <= lam <= 1.0 and sorted(other.tolist()) == list(range(8))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[other])  # labels = indices
    student = torch.randn(8, 10)
    hard = torch.nn.functional.cross_entropy
    expected = lam * hard(student, labels) + (1 - lam) * hard(student, other)
    loss = kd_loss(student, None, labels, 4.0, 0.0, (other, lam))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_colour_shifts_each_image_and_the_teacher_labels_the_view(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    from evaluation.views import recolour

    config, job = view_job(tmp_path, teacher_checkpoint, colour=0.4)
    assert job.teacher is not None and not job.stored_logits and job.colour == 0.4
    assert kd_targets(config, "kd").startswith("teacher run on each mixed, recoloured")

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    pixels = 0.45 + 0.1 * torch.rand(64, 3, 8, 8)  # one mean colour, mid-range: no clipping
    images = (pixels - m) / s
    assert torch.equal(recolour(images, 0.0, mean, std), images)
    out = recolour(images, 0.1, mean, std) * s + m
    assert out.min() >= 0 and out.max() <= 1
    means = out.mean((2, 3))
    assert means.std(0).min() > 3 * pixels.mean((2, 3)).std(0).max()  # images now differ
    # within an image, one contrast factor for all channels and pixels, in [0.9, 1.1]
    within = pixels - pixels.mean((2, 3), keepdim=True)
    centred = out - out.mean((2, 3), keepdim=True)
    factor = (centred * within).sum((1, 2, 3)) / (within * within).sum((1, 2, 3))
    assert factor.min() >= 0.9 - 1e-4 and factor.max() <= 1.1 + 1e-4 and factor.std() > 0.02
    assert torch.allclose(centred, factor.view(-1, 1, 1, 1) * within, atol=1e-5)


def test_blur_gives_each_image_its_own_gaussian_and_the_teacher_labels_the_view(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    from evaluation.views import blur

    config, job = view_job(tmp_path, teacher_checkpoint, blur=1.5)
    assert job.teacher is not None and not job.stored_logits and job.blur == 1.5
    assert "blurred" in kd_targets(config, "kd")
    with pytest.raises(InputError, match="blur is a largest sigma"):
        parse_eval_config(
            config_for(tmp_path, teacher_checkpoint, Path(config.data.shards), blur=-1)
        )

    torch.manual_seed(0)
    images = torch.randn(64, 3, 16, 16)
    assert torch.equal(blur(images, 0.0), images)
    flat = torch.full((4, 3, 16, 16), 0.7)
    assert torch.allclose(blur(flat, 1.5), flat)  # each kernel sums to one
    impulse = torch.zeros(64, 3, 17, 17)
    impulse[:, :, 8, 8] = 1.0
    out = blur(impulse, 1.5)
    assert torch.allclose(out.sum((2, 3)), torch.ones(64, 3), atol=1e-5)  # mass kept
    assert torch.allclose(out, out.transpose(2, 3), atol=1e-6)  # separable, one kernel
    assert torch.allclose(out[:, 0], out[:, 2])  # the same kernel for every channel
    offsets = (torch.arange(17.0) - 8) ** 2
    spread = (out[:, 0].sum(1) * offsets).sum(1).sqrt()  # each image's sigma (truncated)
    assert spread.min() >= 0 and spread.max() <= 1.5 and spread.std() > 0.2


def test_jpeg_reencodes_each_view_in_the_loader_and_the_teacher_labels_it(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    import io

    import numpy as np
    from PIL import Image

    from evaluation.views import jpeg

    config, job = view_job(tmp_path, teacher_checkpoint, jpeg=60)
    assert job.teacher is not None and not job.stored_logits and job.jpeg == 60
    assert kd_targets(config, "kd").endswith("or re-encoded view the student sees")
    shards = Path(config.data.shards)
    for bad, message in ((96, "jpeg is a lowest quality"), (75.5, "expected an integer")):
        with pytest.raises(InputError, match=message):
            parse_eval_config(config_for(tmp_path, teacher_checkpoint, shards, jpeg=bad))
    with pytest.raises(ValueError, match="stored logits describe the stored image"):
        ShardDataset(job.shards, job.mean, job.std, logits=True, jpeg=60)

    def pixels(dataset: ShardDataset) -> torch.Tensor:
        images = torch.stack([image for image, _ in dataset])
        std, mean = torch.tensor(job.std).view(3, 1, 1), torch.tensor(job.mean).view(3, 1, 1)
        return (images * std + mean).mul(255).round().to(torch.uint8)

    stored = pixels(ShardDataset(job.shards, job.mean, job.std, seed=3))
    viewed = pixels(ShardDataset(job.shards, job.mean, job.std, jpeg=60, seed=3))
    assert torch.equal(viewed, pixels(ShardDataset(job.shards, job.mean, job.std, jpeg=60, seed=3)))

    def encoded(image: torch.Tensor, quality: int) -> torch.Tensor:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
        return torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(
            2, 0, 1
        )

    qualities = []
    for before, after in zip(stored, viewed, strict=True):
        assert not torch.equal(before, after)  # every image is re-encoded
        matches = [q for q in range(60, 96) if torch.equal(encoded(before, q), after)]
        assert matches, "not a JPEG re-encoding at a quality in [60, 95]"
        qualities.append(matches[0])
    assert len(set(qualities)) > 3  # a quality drawn per image
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(jpeg(stored[0], 0, generator), stored[0])


def test_jpeg_teacher_stored_answers_the_image_before_reencoding(
    teacher_checkpoint: str, tmp_path: Path
) -> None:
    from torch.utils.data import DataLoader

    from evaluation.training import _epoch

    config, job = view_job(tmp_path, teacher_checkpoint, jpeg=60, jpeg_teacher="stored")
    assert job.jpeg_teacher == "stored" and not job.stored_logits
    assert kd_targets(config, "kd").startswith("teacher run on each stored image")
    shards = Path(config.data.shards)
    with pytest.raises(InputError, match="jpeg_teacher: stored needs jpeg"):
        parse_eval_config(config_for(tmp_path, teacher_checkpoint, shards, jpeg_teacher="stored"))
    with pytest.raises(InputError, match="jpeg_teacher: stored pairs each view"):
        parse_eval_config(
            config_for(
                tmp_path, teacher_checkpoint, shards, jpeg=60, jpeg_teacher="stored", mixup=1
            )
        )

    plain = [image for image, _ in ShardDataset(job.shards, job.mean, job.std, seed=3)]
    viewed = [image for image, _ in ShardDataset(job.shards, job.mean, job.std, jpeg=60, seed=3)]
    paired = list(
        ShardDataset(job.shards, job.mean, job.std, jpeg=60, jpeg_teacher="stored", seed=3)
    )
    for (view, _, stored), before, after in zip(paired, plain, viewed, strict=True):
        assert torch.equal(stored, before) and torch.equal(view, after)

    class Recording(torch.nn.Module):  # the teacher, keeping what it was asked
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.asked = inner, []

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            self.asked.append(images)
            return self.inner(images)

    teacher = Recording(job.teacher.eval())
    dataset = ShardDataset(
        job.shards, job.mean, job.std, jpeg=60, jpeg_teacher="stored", seed=3, batch_size=5
    )
    model = build_architecture("resnet20", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(dataset, batch_size=None)
    _epoch(model, teacher, loader, optimizer, job, torch.device("cpu"), dataset.steps())
    assert torch.equal(torch.cat(teacher.asked), torch.stack(plain))


def test_recalibration_averages_the_batches_and_leaves_the_model_as_it_was() -> None:
    from evaluation.views import recalibrate

    torch.manual_seed(0)
    model = build_architecture("resnet20", 10).train()
    batches = [torch.randn(20, 3, 8, 8) + shift for shift in (0.0, 1.0, 2.0)]
    recalibrate(model, batches, 0.0, (0.0,) * 3, (1.0,) * 3, only=("bn1",))
    with torch.no_grad():
        stem = model.conv1(torch.cat(batches))
    assert torch.allclose(model.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == 3 and model.bn1.momentum == 0.1
    assert not model.training and int(model.layer1[0].bn1.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="no batch norm layer to recalibrate"):
        recalibrate(model, batches, 0.0, (0.0,) * 3, (1.0,) * 3, only=("head",))


def test_stored_logits_on_shards_without_them_exit_2_naming_the_shard(
    teacher_checkpoint: str, tmp_path: Path, capsys
) -> None:
    with_logits = write_sized_shards(tmp_path / "run", [4, 4])
    write_sized_shards(tmp_path / "other", [3], logits=False)
    lacking = tmp_path / "other" / "shards" / "train-000000"
    for suffix in (".tar", ".json"):  # a third shard, without logits.npy
        Path(f"{lacking}{suffix}").rename(with_logits / "shards" / f"train-000002{suffix}")
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config_for(tmp_path, teacher_checkpoint, with_logits)))
    assert main(["eval", "kd", str(path)]) == 2
    error = capsys.readouterr().err
    assert "train.logits is stored but shard" in error
    assert "train-000002.tar holds no logits.npy" in error
