"""IMAGINE's config: the paper's defaults (and the supplement's Table 1) with their checks;
the method itself is :mod:`synthesizers.imagine`."""

from __future__ import annotations

from dataclasses import dataclass

from synthesizers.spec import Switch, SynthesizerConfig


@dataclass
class ImagineConfig(SynthesizerConfig):
    iterations: int = 4000  # both stages: 2,000 + 2,000
    lr: float = 0.2  # Adam for x̂
    compile: Switch = "off"  # D is rebuilt per request: a compiled step would recompile
    adversarial_fraction: float = 0.5  # share of the iterations in stage 2
    ce_weight: float = 1.0
    tv_weight: float = 1e-4  # α
    l2_weight: float = 1e-5  # β
    feature_weight: float = 5.0  # λ
    adversarial_weight: float = 10.0  # γ in stage 2 (0: no discriminator, one stage)
    layers: list[str] | None = None  # Φ by module name; None: per teacher (module doc)
    target_crop: float = 0.8  # random crop of the targets each iteration; 1 disables it
    discriminator_lr: float = 5e-4
    discriminator_betas: tuple[float, float] = (0.5, 0.999)  # SinGAN's
    discriminator_width: int = 128  # Table 1
    discriminator_blocks: int = 3  # Table 1: head + 3 blocks
    gradient_penalty: float = 10.0  # λ_GP: the WGAN-GP paper's (the supplement gives none)
    position: list[float] | None = None  # [x, y] blob centre, fractions of width, height
    position_sigma: float = 0.15  # blob width, a fraction of the side
    position_weight: float = 10.0  # ν
    position_layer: str | None = None  # Grad-CAM layer; None: the deepest Φ layer
    shape_image: str | None = None  # URL of the shape image (loaded by the pipeline)
    shape_layers: list[str] | None = None  # Φ^c; None: the deepest Φ layer
    style_image: str | None = None  # URL of the style image (loaded by the pipeline)
    style_layers: list[str] | None = None  # Φ^s; None: Φ without the deepest layer
    counterfactual_weight: float = 1.0  # of ‖r^q ⊙ (x^q − x̂)‖₁ (Eq. 13)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.adversarial_fraction <= 1.0:
            raise ValueError(
                f"adversarial_fraction must be in [0, 1], got {self.adversarial_fraction}"
            )
        for name in (
            "ce_weight",
            "tv_weight",
            "l2_weight",
            "feature_weight",
            "adversarial_weight",
            "gradient_penalty",
            "position_weight",
            "counterfactual_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0.0 < self.target_crop <= 1.0:
            raise ValueError(f"target_crop must be in (0, 1], got {self.target_crop}")
        if self.discriminator_lr <= 0 or self.discriminator_width < 1:
            raise ValueError("discriminator_lr and discriminator_width must be positive")
        if self.discriminator_blocks < 0:
            raise ValueError(f"discriminator_blocks must be >= 0, got {self.discriminator_blocks}")
        if self.position is not None:
            if len(self.position) != 2:
                raise ValueError(f"position must be [x, y], got {self.position}")
            if not all(0.0 <= v <= 1.0 for v in self.position):
                raise ValueError(
                    f"position {list(self.position)} is outside the image: x and y are "
                    "fractions of the width and height, each in [0, 1] ((0, 0) is top-left)"
                )
        if not 0.0 < self.position_sigma <= 1.0:
            raise ValueError(f"position_sigma must be in (0, 1], got {self.position_sigma}")
        if self.shape_image and self.style_image:
            raise ValueError("give shape_image or style_image, not both")
        for name in ("layers", "shape_layers", "style_layers"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty list of module names, or null")
