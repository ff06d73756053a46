"""Fold batch-norm layers into the convolutions that feed them (inference maths).

``fuse_batchnorm(model)`` returns a copy in eval mode in which every BN whose input is
the output of a convolution, and only used by that BN, is folded into the convolution
with :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`: W' = W·γ/√(σ²+ε),
b' = (b − μ)·γ/√(σ²+ε) + β, with the BN's running statistics. This is the network an
inference toolchain ships, and the one the class-conditional synthesizer inverts.

Which BN follows which convolution is read from a :mod:`torch.fx` trace of the model,
the way ``torch.fx.experimental.optimization.fuse`` matches its (conv, BN) pattern.
Unlike that function, the result is not a ``GraphModule``: the trace is used only to
find the pairs, and the copy keeps its own class and ``forward``. Module names are
therefore exactly the original ones: a fused convolution keeps its name (say
``layer1.0.conv1``, now with a bias), and its BN (``layer1.0.bn1``) becomes an
:class:`torch.nn.Identity` under the same name, so a hook on either name sees the
fused convolution's output. (A ``GraphModule`` would keep the convolutions' qualified
names too, but drop the BN names and every container that holds no called module.)

A BN that cannot be folded is reported: one after a residual sum (the pre-activation
BN of a Wide ResNet block), after a pooling or a ReLU, on the network input, one that
is called twice, has no running statistics, or follows a convolution whose output is
also used elsewhere. With ``strict=True`` (the default) that is a ``ValueError`` listing
them; ``strict=False`` folds what it can and leaves the rest in place.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["FusionPlan", "fuse_batchnorm", "fusion_plan"]


@dataclass
class FusionPlan:
    """What :func:`fuse_batchnorm` would do to a model."""

    pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv name, BN name)
    unfoldable: dict[str, str] = field(default_factory=dict)  # BN name -> why not

    def describe_unfoldable(self) -> str:
        return "; ".join(f"{name} ({reason})" for name, reason in self.unfoldable.items())


class _LeafTracer(fx.Tracer):
    """Keeps every convolution and BN a single ``call_module`` node, also subclasses
    defined outside ``torch.nn`` (which the default tracer would trace through)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (_ConvNd, _BatchNorm)):
            return True
        return super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _LeafTracer().trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError …
        raise ValueError(
            f"cannot fuse batch norm in {type(model).__name__}: torch.fx cannot trace it "
            f"({type(error).__name__}: {error})"
        ) from error


def _describe(node: object) -> str:
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "placeholder":
        return "the network input"
    if node.op == "call_module":
        return f"the output of {node.target}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"the result of {name}"


def fusion_plan(model: nn.Module) -> FusionPlan:
    """The (convolution, BN) pairs that fold, and every other BN with the reason."""
    modules = dict(model.named_modules())
    graph = _trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    plan, seen = FusionPlan(), set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        name, bn = str(node.target), modules[node.target]
        if name in seen:  # a BN called twice is reported once
            continue
        seen.add(name)
        source = node.args[0] if node.args else None
        producer = modules.get(source.target) if _is_module_call(source) else None
        if calls[name] > 1:
            reason = f"called {calls[name]} times"
        elif not bn.track_running_stats or bn.running_mean is None:
            reason = "no running statistics"
        elif not isinstance(producer, _ConvNd):
            reason = f"its input is {_describe(source)}, not a convolution"
        elif calls[source.target] > 1:
            reason = f"{source.target} is called {calls[source.target]} times"
        elif len(source.users) > 1:
            reason = f"the output of {source.target} is also used elsewhere"
        elif producer.out_channels != bn.num_features:
            reason = f"{source.target} has {producer.out_channels} channels, BN {bn.num_features}"
        else:
            plan.pairs.append((str(source.target), name))
            continue
        plan.unfoldable[name] = reason
    for name, module in modules.items():
        if isinstance(module, _BatchNorm) and calls[name] == 0:
            plan.unfoldable[name] = "not called by forward"
    return plan


def _is_module_call(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def fuse_batchnorm(model: nn.Module, strict: bool = True) -> nn.Module:
    """A copy of ``model`` (eval mode; ``model`` itself is untouched) with every BN that
    directly follows a convolution folded into it and replaced by ``nn.Identity``.

    Module names do not change (see the module docstring). Raises ``ValueError`` when
    the model cannot be traced by ``torch.fx``, and, with ``strict=True``, when a BN
    cannot be folded (listing each with the reason).
    """
    fused = copy.deepcopy(model).eval()
    plan = fusion_plan(fused)
    if plan.unfoldable and strict:
        raise ValueError(
            f"{len(plan.unfoldable)} batch-norm layers of {type(model).__name__} do not "
            f"follow a convolution and cannot be folded: {plan.describe_unfoldable()}. "
            f"Pass strict=False to fold the other {len(plan.pairs)} and keep these."
        )
    for conv_name, bn_name in plan.pairs:
        conv = fused.get_submodule(conv_name)
        bn = fused.get_submodule(bn_name)
        folded = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, _ConvTransposeNd))
        _replace(fused, conv_name, folded)
        _replace(fused, bn_name, nn.Identity())
    return fused
