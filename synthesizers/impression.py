"""Impression Space (Fang et al., 2020): impression codes, their decoding, translation.

An image's impression code is the channel mean and variance of every template layer's
response (Eq. 5; the mean alone is Eq. 1); the ensembled code of a set is the mean and
variance over all responses of all its images (Eq. 6). The default template layers are
every convolution, measured on their output.

Decoding (one-shot synthesis, "synthesize anything") optimises noise images until their
code matches a target code; translation (Algorithm 1) starts from source images and adds
the content term λ‖x − x_s‖². Both are the ``impression`` synthesizer: targets come from
``spec.guidance["class_statistics"]`` = ``{layer: (mean, var)}``, each (K, C), row k the
ensembled code of class k's images; translation adds ``guidance["init_images"]``.

Which code of the synthesized images is matched (``match``): Algorithm 1 computes it
"by Eqn. 6 or 5". The default, ``class``, ensembles the images of each class in the
batch (Eq. 6), like with like, since the target is itself an ensembled code; only the
set must carry the target's features, so single images stay free to differ (the paper's
one-shot batches are diverse, Fig. 3). ``sample`` matches every image's own code (Eq. 5)
to its class's row, independently of the rest of the batch.

Defaults from supplement G.1: Adam lr 0.1, betas (0.5, 0.9), 2,000 iterations, random
crop and flip each iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from random import Random

import torch
import torch.nn.functional as F
from torch import nn

from synthesizers.base import Synthesizer
from synthesizers.hooks import LayerStatistics, capture_statistics, conv_layers, named_layers
from synthesizers.parametrisation import normalise
from synthesizers.registry import register
from synthesizers.spec import Stage, StepContext, SynthesisSpec, SynthesizerConfig

# {layer name: (mean, var)}, each (N, C) per image, (C,) ensembled or (K, C) per class
Codes = dict[str, tuple[torch.Tensor, torch.Tensor]]
MATCHES = ("class", "sample")


def template_layers(model: nn.Module, names: Sequence[str] | None = None) -> list:
    """``(name, module)`` of the named layers, or of every convolution when ``names`` is
    None. An unknown name is a ``KeyError`` listing the valid ones."""
    layers = conv_layers(model) if names is None else named_layers(model, names)
    if not layers:
        raise KeyError("the model has no convolutions; name the template layers")
    return layers


@torch.no_grad()
def encode(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[tuple[str, nn.Module]],
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
) -> tuple[Codes, torch.Tensor]:
    """Per-image impression codes of normalised ``images`` (N, C, H, W), and the logits.

    The model must be in eval mode (batch norm then uses its running statistics, so an
    image's code does not depend on the rest of its batch). ``dtype`` is an autocast
    dtype (bf16) or None for fp32; the moments are always accumulated in fp32.
    """
    means: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    variances: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    logits = []
    device = images.device
    with capture_statistics(layers, side="output") as records:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if dtype is None:
                logits.append(model(batch).float())
            else:
                with torch.autocast(device.type, dtype=dtype):
                    logits.append(model(batch).float())
            for record in records:
                mean, var = record.per_sample()  # (B, C) each
                means[record.name].append(mean)
                variances[record.name].append(var)
    codes = {name: (torch.cat(means[name]), torch.cat(variances[name])) for name, _ in layers}
    return codes, torch.cat(logits)


def ensemble(codes: Codes) -> Codes:
    """Eq. 6: the code of the whole set, (C,) per layer, from per-image codes (N, C).

    Exact for images of one size: the mean over all responses is the mean of the
    images' means, and the variance is the mean of their variances plus the variance of
    their means (the parallel formula; never E[x²] − E[x]², which cancels in float32).
    """
    result = {}
    for name, (mean, var) in codes.items():
        first = mean.mean(dim=0)
        result[name] = (first, var.mean(dim=0) + (mean - first).square().mean(dim=0))
    return result


def class_codes(codes: Codes, labels: torch.Tensor, num_classes: int) -> tuple[Codes, torch.Tensor]:
    """The ensembled code of each class's images, (K, C) per layer, and the (K,) image
    counts. Rows of classes without images are zero (their count is 0)."""
    counts = torch.bincount(labels, minlength=num_classes)
    result = {}
    for name, (mean, var) in codes.items():
        one_hot = F.one_hot(labels, num_classes).to(mean.dtype)  # (N, K)
        scale = 1.0 / counts.clamp_min(1).to(mean.dtype)[:, None]
        first = (one_hot.t() @ mean) * scale  # (K, C)
        spread = (mean - first[labels]).square()  # (N, C) around the own class's mean
        result[name] = (first, (one_hot.t() @ (var + spread)) * scale)
    return result, counts


def flatten(codes: Codes, mean_only: bool = False) -> torch.Tensor:
    """The code vector z = [μ(r_1), σ²(r_1), …] (Eq. 5; Eq. 1 with ``mean_only``):
    (N, D) from per-image codes, (D,) from an ensembled one."""
    parts = []
    for mean, var in codes.values():
        parts.append(mean)
        if not mean_only:
            parts.append(var)
    return torch.cat(parts, dim=-1)


def distance(codes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean impression distance between flat codes (N, D) and targets
    (T, D) -> (N, T)."""
    codes, targets = codes.float(), targets.float()
    difference = codes[:, None, :] - targets[None, :, :]  # (N, T, D)
    return (difference * difference).sum(dim=-1)


def impression_loss(
    features: Sequence[LayerStatistics],
    targets: Codes,
    labels: torch.Tensor,
    match: str = "class",
    mean_only: bool = False,
) -> torch.Tensor:
    """½‖z − ẑ‖² (Eq. 2) summed over layers, averaged over the classes in the batch
    (``match="class"``, Eq. 6 per class) or over the images (``match="sample"``)."""
    total = features[0].per_sample()[0].new_zeros(())
    num_classes = next(iter(targets.values()))[0].shape[0]
    for record in features:
        target_mean, target_var = targets[record.name]
        if match == "class":
            mean, var, counts = record.per_class(labels, num_classes)
            present = counts > 0
            mean, var = mean[present], var[present]
            target_mean, target_var = target_mean[present], target_var[present]
        else:
            mean, var = record.per_sample()
            target_mean, target_var = target_mean[labels], target_var[labels]
        squared = (mean - target_mean).pow(2).sum(dim=1)
        if not mean_only:
            squared = squared + (var - target_var).pow(2).sum(dim=1)
        total = total + 0.5 * squared.mean()
    return total


def content_loss(images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """‖x − x_s‖² per image (summed over its pixels), averaged over the batch."""
    return (images - sources).pow(2).flatten(1).sum(dim=1).mean()


def random_crop(images: torch.Tensor, rng: Random, min_side: float) -> torch.Tensor:
    """A random square crop of side ``min_side``…1 of the image, resized back."""
    height, width = images.shape[-2:]
    side = min(height, width)
    crop = max(1, round(side * rng.uniform(min_side, 1.0)))
    if crop >= side and height == width:
        return images
    top, left = rng.randint(0, height - crop), rng.randint(0, width - crop)
    patch = images[:, :, top : top + crop, left : left + crop]
    return F.interpolate(patch, size=(height, width), mode="bilinear", align_corners=False)


@dataclass
class ImpressionConfig(SynthesizerConfig):
    iterations: int = 2000
    lr: float = 0.1
    jitter: int = 0  # the paper crops instead (crop_min_side)
    layers: list[str] | None = None  # template layers; None: every convolution
    mean_only: bool = False  # Eq. 1 (means only) instead of Eq. 5
    match: str = "class"  # class: Eq. 6 per class in the batch; sample: each image's own code
    impression_weight: float = 1.0
    content_weight: float = 0.0  # λ of translation (supplement Table 3: 8e-6 … 5e-5)
    crop_min_side: float = 0.8  # random crop each iteration; 1 disables it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        if self.content_weight < 0 or self.impression_weight < 0:
            raise ValueError("impression_weight and content_weight must be non-negative")
        if not 0.0 < self.crop_min_side <= 1.0:
            raise ValueError(f"crop_min_side must be in (0, 1], got {self.crop_min_side}")
        if self.layers is not None and not self.layers:
            raise ValueError("layers must be a non-empty list, or null for every convolution")


@register("impression")
class ImpressionSynthesizer(Synthesizer):
    """Decode impression codes (noise start) or translate images (``init_images``)."""

    config_class = ImpressionConfig
    config: ImpressionConfig
    feature_side = "output"
    uses_metadata = True  # the metadata stage's per-class statistics are class codes (Eq. 6)

    def setup(self) -> None:
        super().setup()
        try:
            self.layers = template_layers(self.teacher, self.config.layers)
        except KeyError as error:
            raise ValueError(f"synthesizer.layers: {error.args[0]}") from None
        self.targets: Codes = {}
        self.sources: torch.Tensor | None = None

    def feature_layers(self) -> list[tuple[str, nn.Module]]:
        return self.layers

    def prepare(self, spec: SynthesisSpec) -> None:
        """Check the guidance against the template layers and move it to the device."""
        statistics = spec.guidance.get("class_statistics")
        if not isinstance(statistics, dict):
            raise ValueError("the impression synthesizer needs guidance['class_statistics']")
        missing = [name for name, _ in self.layers if name not in statistics]
        if missing:
            raise ValueError(f"class_statistics has no code for layers {missing[:5]}")
        self.rows = spec.guidance.get("statistics_index", spec.labels).to(self.device)
        if self.rows.shape != spec.labels.shape:
            raise ValueError("statistics_index must give one row per sample")
        self.targets = {}
        for name, module in self.layers:
            mean, var = (t.to(self.device, torch.float32) for t in statistics[name])
            channels = getattr(module, "out_channels", mean.shape[-1])
            if mean.ndim != 2 or mean.shape != var.shape or mean.shape[1] != channels:
                raise ValueError(f"class_statistics[{name!r}] must be two (K, {channels}) tensors")
            if int(self.rows.max()) >= mean.shape[0] or int(self.rows.min()) < 0:
                raise ValueError(
                    f"labels (or statistics_index) go beyond the {mean.shape[0]} rows of "
                    "class_statistics"
                )
            self.targets[name] = (mean, var)
        init = spec.guidance.get("init_images")
        if self.config.content_weight > 0 and init is None:
            raise ValueError("content_weight needs guidance['init_images'] (translation)")
        self.sources = None
        if init is not None:  # the content term compares in the optimised, normalised space
            self.sources = normalise(init.float(), spec.mean, spec.std).to(self.device)

    def augment(self, images: torch.Tensor, rng: Random) -> torch.Tensor:
        if self.config.crop_min_side < 1.0:
            images = random_crop(images, rng, self.config.crop_min_side)
        return super().augment(images, rng)

    def weights(self, stage: Stage) -> dict[str, float]:
        c = self.config
        return {"impression": c.impression_weight, "content": c.content_weight}

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        terms = {
            "impression": impression_loss(
                ctx.features, self.targets, self.rows, self.config.match, self.config.mean_only
            )
        }
        if self.sources is not None:
            terms["content"] = content_loss(ctx.images.float(), self.sources)
        return terms
