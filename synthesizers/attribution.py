"""Grad-CAM attribution maps and the Gaussian blobs IMAGINE's position control pulls
them toward (Eq. 10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grad_cam(
    activations: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of class ``labels`` (B,) from a layer's
    ``activations`` (B, C, h, w) that produced ``logits`` (B, K): ReLU(Σ_c α_c A_c) with
    α_c the spatial mean of ∂f_y/∂A_c, each map divided by its maximum, resized to
    ``size`` (H, W). (B, H, W) in [0, 1].

    The channel weights α are detached (a first-order gradient, no double backward):
    the map stays differentiable through the activations, which is what moves it.
    """
    score = logits.float().gather(1, labels.view(-1, 1)).sum()
    (gradient,) = torch.autograd.grad(score, activations, retain_graph=True)
    alpha = gradient.float().mean(dim=(2, 3), keepdim=True).detach()  # (B, C, 1, 1)
    cam = F.relu((alpha * activations.float()).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-8).view(-1, 1, 1, 1)
    return (cam / peak).squeeze(1)


def gaussian_blob(
    size: tuple[int, int], x: float, y: float, sigma: float, device: torch.device | None = None
) -> torch.Tensor:
    """(H, W) Gaussian of peak 1 centred at (``x``, ``y``) and of width ``sigma``, all
    three as fractions of the image side (x of the width, y of the height; (0, 0) is
    the top-left corner)."""
    height, width = size
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    squared = (rows.view(-1, 1) - y) ** 2 + (cols.view(1, -1) - x) ** 2
    return torch.exp(-squared / (2.0 * sigma * sigma))


def centroid(maps: torch.Tensor) -> torch.Tensor:
    """(B, 2) centre of mass (x, y) of non-negative maps (B, H, W), in side fractions."""
    height, width = maps.shape[-2:]
    rows = (torch.arange(height, dtype=maps.dtype, device=maps.device) + 0.5) / height
    cols = (torch.arange(width, dtype=maps.dtype, device=maps.device) + 0.5) / width
    mass = maps.flatten(1).sum(dim=1).clamp_min(1e-12)
    x = (maps.sum(dim=1) * cols).sum(dim=1) / mass
    y = (maps.sum(dim=2) * rows).sum(dim=1) / mass
    return torch.stack([x, y], dim=1)


def location_loss(cams: torch.Tensor, blob: torch.Tensor) -> torch.Tensor:
    """Eq. 10: ‖m − a⁰‖₂ per image ((B, H, W) maps against a (H, W) or (B, H, W)
    blob), averaged over the batch."""
    return (cams - blob).flatten(1).norm(dim=1).mean()
