"""Teachers: an architecture from the registry plus a checkpoint from any fsspec URL."""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import TeacherConfig
from pipeline.errors import InputError
from pipeline.io.storage import read_bytes
from pipeline.models.archs import build_architecture

PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Teacher:
    """A loaded teacher: the model (eval mode, raw logits on normalised input), its
    spec and the sha256 of its checkpoint."""

    model: nn.Module
    config: TeacherConfig
    digest: str


def load_checkpoint(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(state dict, metadata, sha256) of a checkpoint, loaded with ``weights_only=True``.

    Accepts a bare state dict, a ``{"state_dict": …}`` (or ``{"model": …}``) wrapper and
    ``module.`` prefixes. Metadata is the ``meta`` entry dreamshard's own checkpoints carry.
    """
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError as error:
        raise InputError(f"teacher.checkpoint: {url} does not exist") from error
    except (OSError, PermissionError) as error:
        raise InputError(f"teacher.checkpoint: {url} cannot be read ({error})") from error
    digest = hashlib.sha256(data).hexdigest()
    loaded = load_weights(data, f"teacher.checkpoint: {url}")
    if not isinstance(loaded, dict):
        raise InputError(
            f"teacher.checkpoint: {url} holds a {type(loaded).__name__}, not a state dict"
        )
    meta = loaded.get("meta", {}) if isinstance(loaded.get("meta"), dict) else {}
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    state = {}
    for key, value in loaded.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        if isinstance(value, torch.Tensor):
            state[key] = value
    return state, meta, digest


def load_weights(source: bytes | str, where: str) -> Any:
    """``torch.load`` of checkpoint bytes (or a local file) with ``weights_only=True``:
    tensors and plain containers only, so a pickle that would run code is refused.
    :class:`InputError` names ``where`` (the field and URL) otherwise."""
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"{where} was refused: it holds objects other than tensors "
            f"and plain containers, and dreamshard only loads with weights_only=True"
        ) from error
    except Exception as error:  # truncated zip, not a torch file at all …
        raise InputError(
            f"{where} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from error


def classifier_name(model: nn.Module) -> str | None:
    """The name of the model's last linear layer (its classifier)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], config: TeacherConfig) -> None:
    """Raise :class:`InputError` naming what does not fit between model and checkpoint."""
    expected = model.state_dict()
    head = classifier_name(model)
    if head and f"{head}.weight" in state and f"{head}.weight" in expected:
        found = state[f"{head}.weight"].shape[0]
        if found != config.num_classes:
            raise InputError(
                f"teacher.num_classes is {config.num_classes} but the checkpoint's "
                f"classifier {head!r} has {found} outputs"
            )
    # Old checkpoints lack BN's num_batches_tracked; load_state_dict fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise InputError(
            f"teacher.checkpoint does not fit architecture {config.arch!r}: "
            f"{len(missing)} missing keys (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})"
        )
    for key, tensor in expected.items():
        if key in state and state[key].shape != tensor.shape:
            raise InputError(
                f"teacher.checkpoint does not fit architecture {config.arch!r}: {key} has "
                f"shape {tuple(state[key].shape)}, the architecture wants {tuple(tensor.shape)}"
            )


def check_meta(meta: dict[str, Any], config: TeacherConfig) -> None:
    """Compare the spec with what a dreamshard checkpoint says it was trained as."""
    for field in ("arch", "num_classes", "image_size"):
        if field in meta and meta[field] != getattr(config, field):
            raise InputError(
                f"teacher.{field} is {getattr(config, field)!r} but the checkpoint was "
                f"trained with {field}={meta[field]!r}"
            )


def load_teacher(config: TeacherConfig, storage_options: dict[str, Any] | None = None) -> Teacher:
    """Build the architecture, load the checkpoint strictly, check a forward pass."""
    model = build_architecture(config.arch, config.num_classes)
    state, meta, digest = load_checkpoint(config.checkpoint, storage_options)
    check_meta(meta, config)
    check_fits(model, state, config)
    model.load_state_dict(state, strict=True)
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, 3, config.image_size, config.image_size))
    except RuntimeError as error:
        raise InputError(
            f"teacher.image_size {config.image_size} does not fit {config.arch!r}: {error}"
        ) from error
    if logits.shape != (2, config.num_classes):
        raise InputError(
            f"teacher {config.arch!r} returns {tuple(logits.shape[1:])} outputs, "
            f"expected {config.num_classes}"
        )
    if config.fuse_bn:
        return Teacher(fuse(model, config.arch), config, f"{digest}+fuse_bn")
    return Teacher(model, config, digest)


def load_verifier(config: TeacherConfig, storage_options: dict[str, Any] | None = None) -> Teacher:
    """The filter's verifier, loaded like a teacher; errors name ``filter.verifier``."""
    try:
        return load_teacher(config, storage_options)
    except InputError as error:
        raise InputError(f"filter.verifier: {error}") from error


def fuse(model: nn.Module, arch: str) -> nn.Module:
    """The BN-fused copy of a teacher; InputError when some BN cannot be folded."""
    from synthesizers.fuse import fuse_batchnorm

    try:
        return fuse_batchnorm(model)
    except ValueError as error:
        raise InputError(f"teacher.fuse_bn: {arch!r} cannot be fused: {error}") from error


def save_checkpoint(model: nn.Module, config: TeacherConfig, url: str, **extra: Any) -> None:
    """Write a dreamshard checkpoint (state dict plus the spec as metadata)."""
    from pipeline.io.storage import atomic_open

    meta = {
        "arch": config.arch,
        "num_classes": config.num_classes,
        "image_size": config.image_size,
        "mean": list(config.mean),
        "std": list(config.std),
        **extra,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "meta": meta}, buffer)
    with atomic_open(url) as f:
        f.write(buffer.getvalue())
