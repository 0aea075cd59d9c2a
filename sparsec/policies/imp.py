"""``imp_rounds``: iterative magnitude pruning with learning-rate rewinding, in the user's own loop.

    for round in sparsec.imp_rounds(model, optimizer, scheduler):
        for epoch in range(epochs):          # the user's training, with the user's schedule
            ...; scheduler.step()
        # leaving the body: prune, then rewind

After every round but the last, the remaining weights of all imp layers are ranked together by
``|w|`` and the smallest ``fraction`` of them removed (global magnitude; ties to the earlier layer,
then the lower flat index; the last pruning lands exactly on the target). Then the learning-rate
schedule restarts: each group's ``lr`` goes back to its first value, the scheduler to its first
state, and optimizer state (momentum, Adam moments) is cleared. With ``rewind="weights"`` every
parameter also goes back to its value at the start (the kept positions' initial values). The target
is the sum of every layer's kept count at its spec's sparsity.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sparsec.errors import SparsecError, SparsecWarning, SpecError
from sparsec.formats import make_layout
from sparsec.nn import sharded
from sparsec.nn.compile import declare_dynamic_storage
from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import Change, Policy
from sparsec.policies.relayout import apply_change
from sparsec.spec import Unstructured, unstructured_with


@dataclass(frozen=True)
class IMP(Policy):
    """Iterative magnitude pruning with learning-rate rewinding (Renda et al. 2020).

    Driven from the user's loop by ``sparsec.imp_rounds``: each round trains with the user's
    learning-rate schedule, then removes ``fraction`` of the remaining weights by global magnitude
    (across all imp layers) and replays the schedule from its start; ``rewind="weights"`` also
    resets the kept weights to their values at initialisation (lottery-ticket style).
    """

    name: ClassVar[str] = "imp"
    changes_density: ClassVar[bool] = True
    fraction: float = 0.2
    rewind: str = "lr"

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction < 1.0):
            raise SpecError(f"imp: fraction={self.fraction!r} must be in (0, 1) (share of remaining weights per round)")
        if self.rewind not in ("lr", "weights"):
            raise SpecError(f"imp: rewind={self.rewind!r} must be 'lr' or 'weights'")

    def initial_spec(self, target, shape: tuple[int, int]):
        if not isinstance(target, Unstructured):
            raise SpecError(
                f"imp prunes by global magnitude across layers, which needs unstructured specs such as 90%; "
                f"got {target}"
            )
        return dataclasses.replace(target, sparsity=0.0)

    def rounds(self, model, optimizer, scheduler=None):
        """``for r in imp.rounds(model, optimizer, scheduler): train...`` (see ``sparsec.imp_rounds``)."""
        return imp_rounds(model, optimizer, scheduler)

    def rounds_to(self, sparsity: float) -> int:
        """Pruning rounds to reach ``sparsity`` removing ``fraction`` of what remains each time."""
        return max(0, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - self.fraction) - 1e-9))


imp = IMP()


def imp_rounds(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> Iterator[int]:
    """Yield round numbers 0..R; prune and rewind after each round but the last (module docstring)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer) and isinstance(m.policy, IMP)}
    if not layers:
        raise SparsecError(
            "imp_rounds needs layers with policy=sparsec.imp (sparsify(model, spec='90%', policy='imp'))"
        )
    policies = {layer.policy for layer in layers.values()}
    if len(policies) != 1:
        raise SparsecError(f"imp layers disagree on their parameters: {sorted(map(str, policies))}; use one imp value")
    (policy,) = policies
    if any(sharded.is_sharded(layer.values) for layer in layers.values()):
        raise SparsecError(
            "imp_rounds prunes into new values Parameters, and FSDP2 (fully_shard) holds these sharded: not "
            "supported; under DistributedDataParallel build the wrapper again at every round"
        )
    declare_dynamic_storage(layers)  # a compiled model serves every round without recompiling
    total = sum(layer.layout.out_features * layer.layout.in_features for layer in layers.values())
    target = sum(
        make_layout(layer.target_spec, layer.layout.out_features, layer.layout.in_features).n_items
        for layer in layers.values()
    )
    rounds = policy.rounds_to(1.0 - target / total)
    first_lrs = [group["lr"] for group in optimizer.param_groups]
    first_schedule = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    start = _snapshot(model, layers) if policy.rewind == "weights" else None
    for r in range(rounds + 1):
        yield r
        if r == rounds:
            return
        remaining = sum(layer.layout.n_items for layer in layers.values())
        keep = target if r == rounds - 1 else max(target, round(remaining * (1.0 - policy.fraction)))
        _prune_globally(layers, optimizer, remaining - keep)
        optimizer.state.clear()
        for group, lr in zip(optimizer.param_groups, first_lrs, strict=True):
            group["lr"] = lr
        if scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(first_schedule))
        if start is not None:
            _rewind_weights(model, layers, start)


@torch.no_grad()
def _prune_globally(layers: dict[str, SparseLayer], optimizer, n_drop: int) -> None:
    """Drop the ``n_drop`` smallest ``|w|`` across the layers, except that no layer is emptied: each keeps
    its largest weight (the prune takes the next smallest elsewhere; a layer would hold sparsity 1.0)."""
    names = list(layers)
    magnitudes = torch.cat([layers[n].values.detach().abs().reshape(-1).float().cpu() for n in names])
    protected, start = [], 0
    for name in names:
        count = layers[name].layout.n_items
        protected.append(start + int(magnitudes[start : start + count].argmax()))
        start += count
    order = magnitudes.argsort(stable=True)  # concatenated in layer order, slots in flat order: ties go first there
    order = order[~torch.isin(order, torch.tensor(protected))]
    if n_drop > order.numel():
        warnings.warn(
            f"imp: pruning {n_drop} weights would empty a layer; pruned {order.numel()}, every layer keeps one",
            SparsecWarning,
            stacklevel=3,
        )
    would_empty = magnitudes.argsort(stable=True)[:n_drop]
    saved = [n for n, p in zip(names, protected, strict=True) if bool((would_empty == p).any())]
    if saved:
        warnings.warn(
            f"imp: global magnitude pruning would empty {', '.join(saved)}; each keeps its largest weight and "
            "the prune takes the next smallest weights elsewhere",
            SparsecWarning,
            stacklevel=3,
        )
    dropped = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    dropped[order[:n_drop]] = True
    start = 0
    for name in names:
        layer = layers[name]
        count = layer.layout.n_items
        survives = ~dropped[start : start + count]
        start += count
        if bool(survives.all()):
            continue
        src = survives.nonzero().flatten().to(layer.values.device)
        flat = layer.positions()[src]
        n = layer.layout.out_features * layer.layout.in_features
        apply_change(layer, optimizer, Change(flat, src, spec=unstructured_with(n, src.numel())))


def _snapshot(model: nn.Module, layers: dict[str, SparseLayer]) -> dict[str, torch.Tensor]:
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, layer in layers.items():
        state[f"{name}.dense_weight" if name else "dense_weight"] = layer.dense_weight().clone()
    return state


@torch.no_grad()
def _rewind_weights(model: nn.Module, layers: dict[str, SparseLayer], start: dict[str, torch.Tensor]) -> None:
    sparse_values = {id(layer.values) for layer in layers.values()}
    for name, p in model.named_parameters():
        if id(p) not in sparse_values and name in start:
            p.copy_(start[name])
    for name, layer in layers.items():
        dense = start[f"{name}.dense_weight" if name else "dense_weight"]
        layer.values.copy_(
            layer.layout.values_from_dense(dense.reshape(layer.layout.out_features, -1), layer.positions())
        )
