"""``sparsify(model, ...)`` and the ``@sparse(...)`` class decorator.

Both replace ``nn.Linear`` and ``nn.Conv2d`` modules in place with compressed sparse layers that
start from the dense layer's values at randomly chosen kept positions (the RigL initial topology).
Per-layer specs come from, in order: ``dense=[...]`` (names or globs kept dense), the first
matching glob of ``overrides``, else the global ``spec`` spread by ``distribution``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import threading
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.formats import item_scores, make_layout
from sparsec.nn.layers import SparseConv2d, SparseLayer, SparseLinear
from sparsec.policies.base import SNIP, Policy, SmallDense, rigl
from sparsec.policies.decision import top_items
from sparsec.policies.distributions import DISTRIBUTIONS
from sparsec.spec import Dense, Spec, parse_policy, parse_spec


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def plan_specs(
    shapes: Mapping[str, tuple[int, ...]],
    spec: str | Spec,
    distribution: str = "uniform",
    dense: Iterable[str] = (),
    overrides: Mapping[str, str | Spec] | None = None,
) -> dict[str, Spec]:
    """The spec of every named layer (weight ``shapes``) after dense, overrides and the distribution."""
    spec = parse_spec(spec)
    dense, overrides = list(dense), dict(overrides or {})
    if distribution not in DISTRIBUTIONS:
        raise SparsecError(f"distribution={distribution!r}; choose one of {sorted(DISTRIBUTIONS)}")
    for pattern in [*dense, *overrides]:
        if not any(_matches(n, pattern) for n in shapes):
            raise SparsecError(f"{pattern!r} matches no Linear/Conv2d layer; the layers are {sorted(shapes)}")
    fixed: dict[str, Spec] = {}
    for name in shapes:
        if any(_matches(name, p) for p in dense):
            fixed[name] = Dense()
        else:
            found = next((s for p, s in overrides.items() if _matches(name, p)), None)
            if found is not None:
                fixed[name] = parse_spec(found)
    free = [n for n in shapes if n not in fixed]
    if distribution != "uniform" and free and not spec.has_free_sparsity:
        raise SparsecError(
            f"distribution={distribution!r} sets a sparsity per layer, but spec {spec} fixes each layer's density; "
            f"use distribution='uniform' or a spec with a sparsity (90%, block(...), fanin(90%))"
        )
    result = dict(fixed)
    if distribution == "uniform" or not free:
        result.update({n: spec for n in free})  # the spec as written: no float round trip
    else:
        densities = DISTRIBUTIONS[distribution]([shapes[n] for n in free], spec.sparsity)
        for name, density in zip(free, densities, strict=True):
            result[name] = Dense() if density >= 1.0 else dataclasses.replace(spec, sparsity=1.0 - density)
    return {n: result[n] for n in shapes}


def sparsify(
    model: nn.Module,
    spec: str | Spec = "90%",
    policy: str | Policy = rigl,
    distribution: str = "uniform",
    dense: Iterable[str] = (),
    overrides: Mapping[str, str | Spec] | None = None,
) -> nn.Module:
    """Replace the model's Linear/Conv2d layers with sparse ones, in place; returns the model."""
    policy = parse_policy(policy)
    if isinstance(policy, SNIP) and policy.loss is None:
        raise SparsecError(
            "snip chooses the mask from one batch: pass policy=sparsec.snip(loss=lambda model: ...), a callable "
            "returning the loss of the dense model on that batch"
        )
    targets = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, SparseLayer)
    }
    if not targets:
        raise SparsecError("the model has no nn.Linear or nn.Conv2d layers to sparsify")
    shapes = {name: tuple(m.weight.shape) for name, m in targets.items()}
    specs = plan_specs(shapes, spec, distribution, dense, overrides)
    if isinstance(policy, SmallDense):
        return shrink_to_budget(model, targets, specs)
    sensitivity = _snip_scores(model, targets, policy.loss) if isinstance(policy, SNIP) else {}
    for name, module in targets.items():
        layer_spec = specs[name]
        if isinstance(layer_spec, Dense):
            continue
        kind = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
        sparse_module = kind.from_dense(module, layer_spec, policy, name=name)
        if name in sensitivity:  # snip: the best |g * w| of every unit instead of a random topology
            layout = sparse_module.layout
            scores = item_scores(layout, sensitivity[name].reshape(layout.out_features, -1))
            sparse_module.take_dense(module.weight, top_items(layout, scores))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, sparse_module)
    return model


def _snip_scores(model: nn.Module, targets: dict[str, nn.Module], loss) -> dict[str, torch.Tensor]:
    """``|g * w|`` of every target layer's dense weight for one evaluation of ``loss(model)``."""
    weights = [m.weight for m in targets.values()]
    grads = torch.autograd.grad(loss(model), weights, allow_unused=True)
    scores = {}
    for (name, module), g in zip(targets.items(), grads, strict=True):
        if g is None:
            raise SparsecError(f"snip: the loss does not depend on layer {name!r}; check the loss callable")
        scores[name] = (g * module.weight).detach().abs()
    return scores


def shrink_to_budget(model: nn.Module, targets: dict[str, nn.Module], specs: dict[str, Spec]) -> nn.Module:
    """small_dense: narrow the hidden widths of a Sequential chain until its weights fit the budget."""
    if not isinstance(model, nn.Sequential) or any(
        p.numel() and not isinstance(m, (nn.Linear, nn.Conv2d))
        for m in model.children()
        for p in m.parameters(recurse=False)
    ):
        raise SparsecError(
            "small_dense narrows hidden widths, which is defined here for an nn.Sequential chain of Linear/"
            "Conv2d layers (and parameter-free modules); build the small dense model by hand for other models"
        )
    layers = [(i, m) for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d))]
    budget = 0
    for name, module in targets.items():
        w = module.weight
        budget += (
            w.numel() if isinstance(specs[name], Dense) else make_layout(specs[name], w.shape[0], w[0].numel()).nnz
        )

    def widths(scale: float) -> list[int]:  # output width of each layer; the last keeps its own
        return [max(1, round(_out(m) * scale)) for _, m in layers[:-1]] + [_out(layers[-1][1])]

    def weights(scale: float) -> int:
        outs, total, prev = widths(scale), 0, None
        for (_, m), out in zip(layers, outs, strict=True):
            total += out * _fan_in(m, prev)
            prev = (out, _out(m))
        return total

    lo, hi = 0.0, 1.0
    for _ in range(50):  # bisection on the width factor
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if weights(mid) <= budget else (lo, mid)
    prev = None
    for (i, m), out in zip(layers, widths(lo), strict=True):
        model[i] = _resized(m, _fan_in(m, prev) // _kernel(m), out)
        prev = (out, _out(m))
    return model


def _out(m) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _kernel(m) -> int:
    return 1 if isinstance(m, nn.Linear) else m.kernel_size[0] * m.kernel_size[1]


def _fan_in(m, prev) -> int:
    """Inputs per output after the previous layer went from ``prev[1]`` to ``prev[0]`` outputs."""
    full = m.in_features if isinstance(m, nn.Linear) else m.in_channels * _kernel(m)
    if prev is None:
        return full
    new, old = prev
    return full * new // old  # a Linear after Flatten sees every channel's positions


def _resized(m, fan_in: int, out: int):
    if isinstance(m, nn.Linear):
        return nn.Linear(fan_in, out, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    return nn.Conv2d(
        fan_in,
        out,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        bias=m.bias is not None,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )


_building = threading.local()


def sparse(spec: str | Spec = "90%", policy: str | Policy = rigl, **sparsify_kwargs):
    """Class decorator: instances of the decorated ``nn.Module`` class come out sparsified.

    ``@sparse(spec="2:4", policy=rigl)`` on a class sparsifies after its ``__init__`` (the
    outermost decorated ``__init__`` when decorated classes nest). Keyword arguments go to
    ``sparsify`` (``distribution``, ``dense``, ``overrides``).
    """
    parse_spec(spec), parse_policy(policy)  # fail at decoration time on a bad spec or policy

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise SparsecError(f"@sparse decorates torch.nn.Module classes, not {cls!r}")
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            depth = getattr(_building, "depth", 0)
            _building.depth = depth + 1
            try:
                original(self, *args, **kwargs)
            finally:
                _building.depth = depth
            if depth == 0:
                sparsify(self, spec=spec, policy=policy, **sparsify_kwargs)

        cls.__init__ = __init__
        return cls

    return decorate
