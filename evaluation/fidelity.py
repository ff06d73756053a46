"""``dreamshard eval fidelity``: how much the synthetic images look like the real ones.

* teacher accuracy on the synthetic images (their ``cls`` labels as targets);
* each independent network's accuracy on them (a different classifier trained on real
  data: a configured checkpoint, nothing is downloaded);
* in that network's penultimate features (the classifier's input): the Fréchet distance
  between synthetic and real test images, named by those features (``fd_resnet20``: not
  "FID", which means Inception-v3 features and is not comparable), precision and recall
  with k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019, as NaturalInversion's
  Table 1), and within-class diversity (mean pairwise feature distance, synthetic next
  to real);
* class balance of the synthetic set, and a t-SNE plot of real vs synthetic features.

Without ``fidelity.networks`` the teacher's own features are used, and the report says so.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from evaluation.config import EvalConfig
from evaluation.inputs import Inputs, prepare
from evaluation.loader import load_all
from evaluation.report import write_report
from pipeline.config import TeacherConfig, build
from pipeline.errors import InputError
from pipeline.models.accuracy import accuracy, normalise
from pipeline.models.teachers import classifier_name, load_teacher


@torch.no_grad()
def logits_and_features(
    model: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch: int = 250,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) and penultimate features (N, D) of uint8 images (N, 3, H, W)."""
    model.eval()
    head = model.get_submodule(classifier_name(model))
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _, args: captured.append(args[0].flatten(1)))
    logits = []
    try:
        for start in range(0, len(images), batch):
            logits.append(model(normalise(images[start : start + batch], mean, std)))
    finally:
        handle.remove()
    return torch.cat(logits), torch.cat(captured).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between two feature sets (N, D)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):
        root = root.real  # numerical noise from a nearly singular product
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point; (N,)."""
    distances = torch.cdist(x, x)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st is the point itself


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """Precision: synthetic points inside the real k-NN manifold; recall: the converse."""
    k = min(k, len(real) - 1, len(fake) - 1)
    real_radii, fake_radii = kth_neighbour_radii(real, k), kth_neighbour_radii(fake, k)
    across = torch.cdist(fake, real)  # (F, R)
    precision = (across <= real_radii.unsqueeze(0)).any(1).double().mean().item()
    recall = (fake_radii.unsqueeze(0) >= across.T).any(1).double().mean().item()
    return {"precision": precision, "recall": recall, "k": k}


def diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise feature distance within each class, averaged over the classes."""
    per_class = []
    for label in labels.unique():
        members = features[labels == label]
        if len(members) > 1:
            distances = torch.cdist(members, members)
            per_class.append(distances.sum().item() / (len(members) * (len(members) - 1)))
    return float(np.mean(per_class)) if per_class else math.nan


def class_balance(labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Per-class counts, normalised entropy (1 = perfectly balanced) and min/max ratio."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    shares = counts / counts.sum()
    entropy = -(shares[shares > 0] * shares[shares > 0].log()).sum().item()
    return {
        "counts": [int(c) for c in counts],
        "entropy": entropy / math.log(num_classes),
        "min_over_max": (counts.min() / counts.max()).item(),
    }


def tsne_plot(real: torch.Tensor, fake: torch.Tensor, seed: int, limit: int = 500) -> bytes:
    """A 2-D t-SNE embedding of real and synthetic features, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from sklearn.manifold import TSNE

    real, fake = real[:limit].numpy(), fake[:limit].numpy()
    points = np.concatenate([real, fake])
    perplexity = max(2.0, min(30.0, (len(points) - 1) / 3))
    embedded = TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(points)
    figure, axes = pyplot.subplots(figsize=(5, 5), dpi=100)
    axes.scatter(*embedded[: len(real)].T, s=6, alpha=0.6, label=f"real ({len(real)})")
    axes.scatter(*embedded[len(real) :].T, s=6, alpha=0.6, label=f"synthetic ({len(fake)})")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    pyplot.close(figure)
    return buffer.getvalue()


def independent_networks(inputs: Inputs) -> list[tuple[str, Any]]:
    """(name, loaded network) for each of ``fidelity.networks`` (teacher fields as defaults)."""
    spec = inputs.teacher_config
    loaded = []
    for index, entry in enumerate(inputs.config.fidelity.networks):
        fields = {**asdict(spec), **entry.overrides()}
        where = f"fidelity.networks[{index}]"
        config = build(TeacherConfig, fields, where)
        try:
            network = load_teacher(config, inputs.options)
        except InputError as error:
            raise InputError(f"{where}: {error}".replace("teacher.", "")) from error
        loaded.append((entry.name or f"{config.arch}-{index}", network))
    return loaded


def run_fidelity(config: EvalConfig) -> dict[str, Any]:
    """Every fidelity metric of the shards against the real test set."""
    inputs = prepare(config, "fidelity", student=False)
    spec, limit = inputs.teacher_config, config.fidelity.max_images
    fake, fake_labels = load_all(inputs.shards, limit, inputs.options)
    generator = torch.Generator().manual_seed(config.run.seed)
    chosen = torch.randperm(len(inputs.test[1]), generator=generator)[:limit]
    real, real_labels = inputs.test[0][chosen], inputs.test[1][chosen]
    teacher_logits, _ = logits_and_features(inputs.teacher.model, fake, spec.mean, spec.std)
    results: dict[str, Any] = {
        "images": {"synthetic": len(fake_labels), "real": len(real_labels)},
        "teacher_accuracy_synthetic": _accuracy(teacher_logits, fake_labels),
        "class_balance": class_balance(fake_labels, spec.num_classes),
    }
    networks = independent_networks(inputs)
    if not networks:
        networks = [("teacher (no independent network configured)", inputs.teacher)]
    rows, plots = [], {}
    for name, network in networks:
        net = network.config
        fake_logits, fake_features = logits_and_features(network.model, fake, net.mean, net.std)
        real_logits, real_features = logits_and_features(network.model, real, net.mean, net.std)
        synthetic = accuracy(fake_logits, fake_labels, fake_logits.shape[1])
        rows.append(
            {
                "network": name,
                "arch": net.arch,
                "accuracy_synthetic": synthetic["accuracy"],
                "accuracy_real": _accuracy(real_logits, real_labels),
                # which classes' images the network recognises (None: a class with no image)
                "per_class_synthetic": dict(
                    zip(inputs.classes, synthetic["per_class"], strict=True)
                ),
                fd_name(net.arch): frechet_distance(fake_features, real_features),
                **precision_recall(real_features.float(), fake_features.float(), config.fidelity.k),
                "diversity_synthetic": diversity(fake_features, fake_labels),
                "diversity_real": diversity(real_features, real_labels),
            }
        )
        if config.fidelity.tsne and not plots:
            plots["tsne.png"] = tsne_plot(real_features, fake_features, config.run.seed)
    results["networks"] = rows
    write_report(inputs, "fidelity", results, {}, plots)
    return results


def fd_name(arch: str) -> str:
    """The Fréchet distance's key, named by the network whose features it compares:
    ``fd_resnet20``, ``fd_torchvision_resnet18``."""
    return "fd_" + re.sub(r"[^0-9a-zA-Z]+", "_", arch).strip("_").lower()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return accuracy(logits, labels, logits.shape[1])["accuracy"]
