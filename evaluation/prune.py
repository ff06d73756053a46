"""``dreamshard eval prune``: L1-norm filter pruning of the teacher, then fine-tuning on
the shards, per ratio.

Structural pruning is done by ``torch-pruning`` (its dependency graph; importance = the
L1 norm of each filter of the pruned layer; the same ratio in every layer). Its graph
tracing does not model the option-A shortcut of the CIFAR ResNets (subsample plus
zero-padding of channels): pruning the residual stream there gives a network whose
shapes no longer fit. For models with such shortcuts the residual-stream convolutions
(the stem and every block's second conv) are left whole and only the block-internal
channels are pruned, which is what Li et al. ("Pruning Filters for Efficient
ConvNets") do for the CIFAR ResNets. Every pruned model is checked with a forward pass.

Fine-tuning distils from the unpruned teacher (``train.temperature``, ``train.alpha``)
for ``prune.epochs`` epochs at ``prune.lr``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from evaluation.config import EvalConfig
from evaluation.fitting import fit
from evaluation.inputs import prepare
from evaluation.kd import train_job
from evaluation.report import write_report
from evaluation.training import evaluate
from pipeline.io.storage import join
from pipeline.models.archs.resnet_cifar import BasicBlock, PadShortcut
from pipeline.models.teachers import classifier_name


def residual_stream_convs(model: nn.Module) -> list[nn.Module]:
    """The convolutions whose output channels feed option-A (zero-padding) shortcuts."""
    if not any(isinstance(m, PadShortcut) for m in model.modules()):
        return []
    stem = [model.conv1] if isinstance(getattr(model, "conv1", None), nn.Conv2d) else []
    return stem + [m.conv2 for m in model.modules() if isinstance(m, BasicBlock)]


def prune_model(model: nn.Module, ratio: float, image_size: int) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the filters of every prunable layer removed
    (lowest L1 norm first)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    head = model.get_submodule(classifier_name(model))
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        # Li et al.'s criterion: the L1 norm of each filter of the layer being pruned
        importance=tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="first"),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[head, *residual_stream_convs(model)],
    )
    pruner.step()
    with torch.no_grad():
        model(example)  # the pruned shapes fit
    return model


def size_of(model: nn.Module, image_size: int) -> dict[str, float]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, image_size, image_size))
    return {"macs": float(macs), "params": float(params)}


def run_prune(config: EvalConfig) -> dict[str, Any]:
    """Prune the teacher at every ratio of ``prune.ratios`` and fine-tune each on the shards."""
    inputs = prepare(config, "prune", student=False)
    spec = inputs.teacher_config
    teacher = inputs.teacher.model
    base = train_job(inputs, teacher, config.train.alpha, copy.deepcopy(teacher))
    before = evaluate(base.model, base)
    original = size_of(teacher, spec.image_size)
    rows, curves = [], {}
    for ratio in config.prune.ratios:
        pruned = prune_model(teacher, ratio, spec.image_size)
        job = train_job(
            inputs,
            pruned,
            config.train.alpha,
            copy.deepcopy(teacher),
            epochs=config.prune.epochs,
            lr=config.prune.lr,
        )
        row: dict[str, Any] = {
            "ratio": ratio,
            **size_of(pruned, spec.image_size),
            "accuracy_pruned": evaluate(job.model, job)["accuracy"],
        }
        if config.prune.epochs:
            name = inputs.job_name("prune", ratio)
            tuned, summary = fit(job, config.runtime, inputs.output, name, inputs.options)
            row.update(
                accuracy_finetuned=summary["final"]["test_accuracy"],
                best=summary["best"],
                resumed_from=summary["resumed_from"],
                history=summary["history"],
                samples_seen=summary["samples_seen"],
            )
            curves[f"ratio {ratio:g}"] = summary["history"]
            path = join(inputs.output, f"pruned-{ratio:g}.pt")
            _save_module(tuned, path, inputs.options)
            row["checkpoint"] = path
        row["params_kept"] = row["params"] / original["params"]
        rows.append(row)
    results = {
        "teacher": spec.arch,
        "accuracy_before": before["accuracy"],
        "original": original,
        "ratios": rows,
        "method": "torch-pruning MetaPruner, filter L1 norm, layer-wise uniform",
    }
    write_report(inputs, "prune", results, curves)
    return results


def _save_module(model: nn.Module, url: str, options: dict[str, Any]) -> None:
    """The pruned model's state dict with its layer shapes (rebuild with torch-pruning's
    ``load_state_dict`` helpers, or prune the architecture again at the same ratio)."""
    import io

    from pipeline.io.storage import atomic_open

    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, buffer)
    with atomic_open(url, options) as f:
        f.write(buffer.getvalue())
