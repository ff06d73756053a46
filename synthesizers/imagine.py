"""IMAGINE: image-guided model inversion (Wang et al., WACV 2021).

Variations of target images x⁰ (``guidance["target_images"]``, (B, C, H, W) in [0, 1],
one per sample; y* = ``spec.labels``, the teacher's prediction on each target):

Loss = CE(f(x̂), y*) + α R_TV(x̂) + β ‖x̂‖₂²                            (Eq. 1, 2)
       + λ Σ_{l∈Φ} ‖μ_l(x̂) − μ_l(x⁰)‖₂ + ‖σ_l(x̂) − σ_l(x⁰)‖₂             (Eq. 5)
       + γ R_pc(x̂),  R_pc = −D(x̂), D a patch discriminator             (Eq. 6–9)

μ_l, σ_l are the channel mean and standard deviation of layer l's output for each image,
matched sample by sample against that sample's own target (a batch may mix targets).
‖x̂‖₂² is each image's squared norm (Eq. 2 squares it), averaged over the batch.
The targets get a random square crop (``target_crop``…1 of the side, resized back) and
a random flip every iteration (supplement); their statistics come from a no-grad forward
of the teacher (eval-mode BN, so per-image statistics do not depend on the batch).

Two stages (``stages()``): matching, γ = 0 and no discriminator at all; then
adversarial, γ = 10, with the discriminator (:mod:`synthesizers.discriminator`, built
afresh per request from the spec's seed) trained one WGAN-GP step after every image
step on real = the iteration's augmented targets, fake = x̂. With γ = 0 there is one
stage. Paper defaults: 2,000 iterations per stage (``iterations`` = both, split by
``adversarial_fraction``), Adam lr 0.2 for x̂, 5e-4 for D, α = 1e-4, β = 1e-5, λ = 5.

Φ (``layers``, module names, outputs) defaults by teacher:

- torchvision ResNet (``conv1`` … ``layer4``, ``maxpool``, ``fc``): the paper's
  conv1_1, conv2_3, conv3_4, conv4_6 of ResNet-50 = ``conv1``, ``layer1.2``,
  ``layer2.3``, ``layer3.5`` (the conv1 output and the last block of the first three
  stages; the same rule gives ``layer1.1``, ``layer2.1``, ``layer3.1`` for ResNet-18);
- CIFAR ResNets (``conv1``, ``bn1``, ``layer1`` …): the end of the stem (``bn1``) and of
  every stage (``layer1``, ``layer2``, ``layer3``);
- any other network: the last conv/BN before every downsampling (a strided conv or a
  pooling layer) and the last conv/BN overall.

Controls (guidance keys; the pipeline loads the config's image URLs into them):

- position (Eq. 10): ``position: [x, y]`` (fractions of width and height) and
  ``position_sigma``: the Grad-CAM map of y* at ``position_layer`` (default: the
  deepest Φ layer) is pulled toward a Gaussian blob there with weight ν = 10. The
  blob follows the images' jitter and flip.
- shape (Eq. 11): ``guidance["shape_image"]`` matched at ``shape_layers`` (default the
  deepest Φ layer), the target at the other Φ layers.
- style (Eq. 12): x̂ starts from the target (the content), ``guidance["style_image"]``
  is matched at ``style_layers`` (default Φ without the deepest) and fed to D as real.
- counterfactual (Eq. 13): :func:`synthesizers.imagine_counterfactual.counterfactual`.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import torch
from torch import nn

from synthesizers.attribution import gaussian_blob, grad_cam, location_loss
from synthesizers.base import Synthesizer
from synthesizers.discriminator import PatchDiscriminator, build_discriminator, critic_loss
from synthesizers.hooks import named_layers
from synthesizers.imagine_config import ImagineConfig
from synthesizers.imagine_support import (
    Reference,
    Statistics,
    as_images,
    default_layers,
    mean_std,
    region_mask,
    sample_statistics_distance,
)
from synthesizers.impression import random_crop
from synthesizers.losses import cross_entropy, squared_l2_prior, total_variation
from synthesizers.parametrisation import Parametrisation, PixelImages, normalise
from synthesizers.registry import register
from synthesizers.spec import Stage, StepContext, SynthesisSpec


@register("imagine")
class Imagine(Synthesizer):
    config_class = ImagineConfig
    config: ImagineConfig
    feature_side = "output"
    uses_metadata = True  # the seeds scenario of the metadata stage supplies the targets
    uses_target_images = True  # ... and their images, as guidance["target_images"]
    image_fields: ClassVar[tuple[str, ...]] = ("shape_image", "style_image")
    # one step's tensors (some hold the autograd graph); dropped when synthesize returns
    step_state: ClassVar[tuple[str, ...]] = (
        "augmented",
        "step_real",
        "reference_statistics",
        "matched",
        "activations",
        "step_blob",
    )

    def setup(self) -> None:
        super().setup()
        c = self.config
        self.defaults = default_layers(self.teacher)
        self.phi = self._layers("layers", c.layers or self.defaults)
        self.shape_layers = self._layers("shape_layers", c.shape_layers or self.phi[-1:])
        self.style_layers = self._layers(
            "style_layers", c.style_layers or self.phi[:-1] or self.phi
        )
        names = [*self.phi, *self.shape_layers, *self.style_layers]
        self.layers = named_layers(self.teacher, list(dict.fromkeys(names)))
        self.position_layer = self._layers("position_layer", [c.position_layer or self.phi[-1]])[0]
        self.references: list[Reference] = []
        self.mode: dict[str, Any] = {}
        self.discriminator: PatchDiscriminator | None = None

    def _layers(self, field: str, names: list[str]) -> list[str]:
        try:
            named_layers(self.teacher, names)
        except KeyError as error:
            raise ValueError(
                f"synthesizer.{field}: {error.args[0]}; this teacher's default Φ is "
                f"{', '.join(self.defaults)}"
            ) from None
        return list(names)

    def feature_layers(self) -> list[tuple[str, nn.Module]]:
        return self.layers

    def stages(self) -> list[Stage]:
        total = self.config.iterations
        adversarial = round(total * self.config.adversarial_fraction)
        if self.config.adversarial_weight == 0 or adversarial == 0:
            return [Stage("matching", total)]
        if adversarial >= total:
            return [Stage("adversarial", total)]
        return [Stage("matching", total - adversarial), Stage("adversarial", adversarial)]

    def weights(self, stage: Stage) -> dict[str, float]:
        c = self.config
        return {
            "ce": c.ce_weight,
            "tv": c.tv_weight,
            "l2": c.l2_weight,
            "feature": c.feature_weight,
            "position": c.position_weight,
            "adversarial": c.adversarial_weight if stage.name == "adversarial" else 0.0,
            "query": c.counterfactual_weight,
        }

    # ---- per request ------------------------------------------------------------------
    def prepare(self, spec: SynthesisSpec) -> None:
        """Check the guidance, build the references, the blob and a fresh discriminator."""
        g, shape, batch = spec.guidance, spec.image_shape, len(spec.labels)
        if "target_images" not in g:
            raise ValueError("imagine needs guidance['target_images'] (B, C, H, W) in [0, 1]")
        self.norm = (spec.mean, spec.std)  # the teacher's normalisation, for normalise()
        targets = as_images(g["target_images"], "target_images", shape, batch).to(self.device)
        if len(targets) != batch:
            targets = targets.expand(batch, -1, -1, -1)
        self.unit_targets = targets
        self.mode = {}
        for field in ("shape_image", "style_image"):
            if getattr(self.config, field) and field not in g:
                raise ValueError(f"{field} is configured but guidance[{field!r}] is missing")
        self._references(g, shape, targets)
        self.blob = None
        if self.config.position is not None:
            x, y = self.config.position
            self.blob = gaussian_blob(shape[1:], x, y, self.config.position_sigma, self.device)
            self.mode["position"] = {
                "x": x,
                "y": y,
                "sigma": self.config.position_sigma,
                "layer": self.position_layer,
            }
        # the targets' crops and flips get their own stream, derived from the request's
        # seed: sharing the loop's seed would replay x̂'s jitter draws for the targets
        self.crop_rng = random.Random(f"imagine-target-crop:{spec.seed}")
        self.discriminator = None
        if any(stage.name == "adversarial" for stage in self.stages()):
            self.discriminator, self.critic_optimizer = build_discriminator(
                spec.image_shape, spec.seed, self.config, self.device
            )

    def _references(
        self, g: dict[str, Any], shape: tuple[int, int, int], targets: torch.Tensor
    ) -> None:
        """What x̂ is matched to (and D's real images): the targets at Φ; the shape image
        at Φ^c and the targets at the rest; the style image at Φ^s; or, for a
        counterfactual, the example's region at Φ (masks are 1 inside the regions)."""
        batch = len(targets)
        rows = torch.arange(batch, device=self.device)
        single = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.query = self.outside = self.inside = None
        if "query_images" in g:  # counterfactual (Eq. 13): masks are 1 inside the regions
            if "shape_image" in g or "style_image" in g:
                raise ValueError("a counterfactual takes no shape_image or style_image")
            self.query = self._normalise(as_images(g["query_images"], "query_images", shape, batch))
            self.inside = region_mask(
                g.get("query_regions"), "query_regions", shape, batch, self.device
            )
            self.outside = 1.0 - self.inside
            region = region_mask(
                g.get("target_regions"), "target_regions", shape, batch, self.device
            )
            masked = self._normalise(targets) * region
            self.references = [Reference("target", masked, self.phi, rows)]
            self.real = targets
            self.mode["counterfactual"] = True
        elif "shape_image" in g:
            shape_image = as_images(g["shape_image"], "shape_image", shape, 1).to(self.device)
            rest = [n for n in self.phi if n not in self.shape_layers]
            self.references = [
                Reference("shape", self._normalise(shape_image), self.shape_layers, single)
            ]
            if rest:
                self.references.append(Reference("target", self._normalise(targets), rest, rows))
            self.real = targets
            self.mode.update(
                shape_image=self.config.shape_image or True, shape_layers=self.shape_layers
            )
        elif "style_image" in g:
            style = as_images(g["style_image"], "style_image", shape, 1).to(self.device)
            self.references = [
                Reference("style", self._normalise(style), self.style_layers, single)
            ]
            self.real = style.expand(batch, -1, -1, -1)
            self.mode.update(
                style_image=self.config.style_image or True, style_layers=self.style_layers
            )
        else:
            self.references = [Reference("target", self._normalise(targets), self.phi, rows)]
            self.real = targets

    def parametrise(self, spec: SynthesisSpec) -> Parametrisation:
        init = spec.guidance.get("init_images")
        if init is None and self.query is not None:
            init = as_images(spec.guidance["query_images"], "query_images", spec.image_shape)
            init = init.expand(len(spec.labels), -1, -1, -1)
        elif init is None and "style_image" in self.mode:  # start from the content
            init = self.unit_targets
        return PixelImages(
            len(spec.labels),
            spec.image_shape,
            spec.mean,
            spec.std,
            None if init is None else init.cpu(),
            self.config.clip,
            self.config.start(),
        )

    def describe(self) -> dict[str, Any]:
        """The controls of the last request, for each sample's json."""
        return {"layers": self.phi, **self.mode}

    # ---- one step -----------------------------------------------------------------------
    def forward_loss(
        self, ctx: StepContext, weights: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Reference statistics (a no-grad forward of the augmented references), the
        masked x̂ of a counterfactual, then the base step with the Grad-CAM layer's output
        kept for the position term."""
        crop, flip = self.config.target_crop, self.crop_rng.random() < 0.5
        self.augmented = {}
        for reference in self.references:
            images = reference.images
            if crop < 1.0:
                images = random_crop(images, self.crop_rng, crop)
            self.augmented[reference.name] = torch.flip(images, dims=(3,)) if flip else images
        self.step_real = torch.flip(self.real, dims=(3,)) if flip else self.real
        self.reference_statistics: dict[str, Statistics] = {}
        self.matched: Statistics | None = None
        if weights["feature"]:
            with torch.no_grad():
                for reference in self.references:
                    self.teacher_forward(self.augmented[reference.name])
                    self.reference_statistics[reference.name] = {
                        r.name: mean_std(r) for r in ctx.features
                    }
            if self.inside is not None:  # Eq. 13 matches the region of x̂ only
                self.teacher_forward(ctx.images * self.inside)
                self.matched = {r.name: mean_std(r) for r in ctx.features}
        if self.blob is None:
            return super().forward_loss(ctx, weights)
        module = dict(self.teacher.named_modules())[self.position_layer]
        handle = module.register_forward_hook(self._keep_activations)
        try:
            return super().forward_loss(ctx, weights)
        finally:
            handle.remove()

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] guidance images -> the teacher's input, on the synthesizer's device."""
        return normalise(images.to(self.device), *self.norm)

    def _keep_activations(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.activations = output

    def augment(self, images: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if self.blob is None:
            return super().augment(images, rng)
        # the blob rides along as an extra channel so that it shifts and flips with x̂
        blob = self.blob.expand(len(images), 1, -1, -1)
        moved = super().augment(torch.cat([images, blob], dim=1), rng)
        self.step_blob = moved[:, -1]
        return moved[:, :-1]

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        terms = {
            "ce": cross_entropy(ctx.logits, ctx.labels),
            "tv": total_variation(ctx.inputs),
            "l2": squared_l2_prior(ctx.inputs),  # Eq. 2: β‖x̂‖², squared
        }
        if self.reference_statistics:
            matched = self.matched or {r.name: mean_std(r) for r in ctx.features}
            terms["feature"] = sum(
                sample_statistics_distance(
                    matched, self.reference_statistics[r.name], r.layers, r.index
                )
                for r in self.references
            )
        if self.blob is not None:
            cams = grad_cam(self.activations, ctx.logits, ctx.labels, tuple(ctx.inputs.shape[-2:]))
            terms["position"] = location_loss(cams, self.step_blob)
        if ctx.stage.name == "adversarial" and self.discriminator is not None:
            terms["adversarial"] = -self.discriminator.score(ctx.images.float()).mean()
        if self.query is not None:
            difference = (self.query - ctx.images.float()) * self.outside
            terms["query"] = difference.abs().flatten(1).sum(dim=1).mean()
        return terms

    def after_step(self, ctx: StepContext) -> None:
        """One WGAN-GP step of the discriminator (stage 2 only)."""
        if ctx.stage.name != "adversarial" or self.discriminator is None:
            return
        real = self._normalise(self.step_real)
        fake = ctx.images.detach().float()
        epsilon = torch.rand(len(fake), device=fake.device)
        self.discriminator.requires_grad_(True)
        loss = critic_loss(self.discriminator, real, fake, self.config.gradient_penalty, epsilon)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        self.discriminator.requires_grad_(False)  # x̂'s step must not train D
        self.critic_loss = float(loss.detach())
