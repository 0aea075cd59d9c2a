"""``sparsify(model, ...)`` and the ``@sparse(...)`` class decorator.

Both replace ``nn.Linear`` and ``nn.Conv2d`` modules in place with compressed sparse layers that
start from the dense layer's values at randomly chosen kept positions (the RigL initial topology),
through the policy's ``prepare`` (snip and small_dense choose otherwise).
Per-layer specs come from, in order: ``dense=[...]`` (names or globs kept dense), the first
matching glob of ``overrides``, else the global ``spec`` spread by ``distribution``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
import re
import threading
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.formats import Layout
from sparsec.nn.attention import SparseMultiheadAttention, unsupported
from sparsec.nn.layers import SparseConv2d, SparseLayer, SparseLinear
from sparsec.policies.base import Policy
from sparsec.policies.distributions import DISTRIBUTIONS
from sparsec.policies.rigl import rigl
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
    init: str | None = None,
) -> nn.Module:
    """Replace the model's Linear/Conv2d layers with sparse ones, in place; returns the model.

    ``init``: the sparse layers' initial values, ``"dense"`` (the dense module's values at the kept
    positions) or ``"sparse"`` (each output rescaled for its kept fan-in); None takes the policy's
    default (its reference implementation's: ``"sparse"`` for srigl, ``"dense"`` otherwise).

    The policy's ``prepare`` builds the result from the planned specs: most put the sparse layers in
    with a random topology, snip chooses each mask first, small_dense narrows the dense model instead.
    """
    policy = parse_policy(policy)
    targets = _targets(model)
    already = [name for name, m in model.named_modules() if isinstance(m, SparseLayer)]
    if already:
        rest = f"; its dense Linear/Conv2d layers are {sorted(targets)}" if targets else ""
        raise SparsecError(
            f"the model is already sparse: {already} are sparse layers{rest}. sparsify a dense model once, "
            "choosing per-layer specs with overrides={'name': spec} and the layers to keep dense with dense=[...]"
        )
    dense = list(dense)
    _separate_attention_projections(model, dense)
    targets = _targets(model)
    if not targets:
        raise SparsecError("the model has no nn.Linear or nn.Conv2d layers to sparsify")
    shapes = {name: tuple(m.weight.shape) for name, m in targets.items()}
    specs = plan_specs(shapes, spec, distribution, dense, overrides)
    _refuse_weight_readers(model, [n for n, s in specs.items() if not isinstance(s, Dense)])
    build = functools.partial(replace_layers, model, targets, specs, policy, init=init)
    return policy.prepare(model, targets, specs, build)


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear/Conv2d layers sparsify may replace: not inside an ``nn.MultiheadAttention`` kept dense (it
    reads its ``out_proj.weight`` itself)."""
    inside = {
        f"{n}.{c}"
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_modules()
        if c
    }
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, SparseLayer) and name not in inside
    }


def _separate_attention_projections(model: nn.Module, dense: list[str]) -> None:
    """Put a ``SparseMultiheadAttention`` with dense ``q``, ``k``, ``v``, ``out_proj`` in place of every
    ``nn.MultiheadAttention`` (the same function: its projections, copied), so each projection is a layer
    that sparsify can plan (``"*.self_attn.q"``). One named in ``dense`` stays as it is (the pattern is
    used up here). ``nn.TransformerEncoder`` is told not to take its fused path, which reads the packed
    projection."""
    changed = False
    for name, mha in list(model.named_modules()):
        if not isinstance(mha, nn.MultiheadAttention):
            continue
        keep = [p for p in dense if _matches(name, p)]
        if keep:
            for p in keep:
                dense.remove(p)
            continue
        why = unsupported(mha)
        if why is not None:
            raise SparsecError(
                f"{name} (nn.MultiheadAttention) cannot have sparse projections: {why}; keep it dense with "
                f"dense=[{name!r}]"
            )
        parent_name, _, attr = name.rpartition(".")
        attention = SparseMultiheadAttention.from_dense(mha, lambda _, linear: linear)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, attention)
        changed = True
    if changed:
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder):
                module.use_nested_tensor = False  # its fused path reads self_attn.in_proj_weight


def _refuse_weight_readers(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse to replace a layer whose owner reads (or ties) ``.weight`` of it in its own code: a sparse
    layer has no ``weight``, so the owner would fail at its first forward. Read from the owner class's
    source (``self.<child>.weight``); containers (Sequential, ModuleList/Dict) read nothing."""
    found = []
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(owner, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        if isinstance(owner, nn.TransformerEncoderLayer) and isinstance(owner.self_attn, SparseMultiheadAttention):
            continue  # it reads linear1.weight only on its fused path, which sparsec's attention declines
        for cls in type(owner).__mro__:
            if cls in (nn.Module, object):
                break
            try:
                source = inspect.getsource(cls)
            except (OSError, TypeError):
                continue
            if re.search(rf"\bself\.{re.escape(attr)}\.weight\b", source):
                found.append((owner_name or "the model", type(owner).__name__, name))
                break
    if found:
        owner, kind, name = found[0]
        names = [n for _, _, n in found]
        raise SparsecError(
            f"{owner} ({kind}) reads {name}.weight in its own code (or ties it), and a sparse layer has no "
            f"dense weight; keep such layers dense with dense={names!r}"
        )


def replace_layers(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    specs: Mapping[str, Spec],
    policy: Policy,
    initial: Callable[[str, Layout], torch.Tensor] | None = None,
    *,
    init: str | None = None,
) -> nn.Module:
    """Put a sparse layer in place of every target whose spec is not dense, starting from the dense
    values at random kept positions, or at ``initial(name, layout)`` (sorted kept item positions)."""
    for name, module in targets.items():
        layer_spec = specs[name]
        if isinstance(layer_spec, Dense):
            continue
        kind = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
        sparse_module = kind.from_dense(module, layer_spec, policy, name=name, init=init)
        if initial is not None:
            sparse_module.take_dense(module.weight, initial(name, sparse_module.layout))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, sparse_module)
    return model


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
