"""snfs: sparse momentum (Dettmers & Zettlemoyer 2019), the dense momentum shadow and the cross-layer
drop/redistribute/grow update."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsec.errors import SpecError
from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import Capture, Change, Context, Policy, rows_of_every_rank, world_size
from sparsec.policies.decision import choose_drops, drop_scores, n_drop_for, remap_positions, survivor_mask
from sparsec.policies.schedule import cosine_drop_fraction, is_update_step
from sparsec.runtime.selection import grad_row_chunks, rank_in_unit
from sparsec.spec import Unstructured, unstructured_with
from sparsec.spec.policy import check_fraction, check_regrow, check_schedule


class MomentumShadow(Capture):
    """Dense momentum of every weight of one layer, kept like the optimizer keeps it for kept weights.

    The layer's state (``SNFS.layer_state``) and its capture at every step: each backward hands it
    ``dY`` and ``X``, and it folds ``dY^T X`` chunk by chunk of output rows into SGD's
    ``m = beta m + (1 - dampening) g`` or Adam's ``m``, ``v``. O(out x in) memory by design (see SNFS).
    """

    def __init__(self, layer: SparseLayer, optimizer):
        self.layer, self.optimizer = layer, optimizer
        shape = (layer.layout.out_features, layer.layout.in_features)
        self.m = torch.zeros(shape, dtype=torch.float32, device=layer.values.device)
        self.v = torch.zeros_like(self.m) if self._adam() else None
        self.steps = 0

    def _group(self) -> dict:
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            if any(p is self.layer.values for p in group["params"]):
                return group
        return {}

    def _adam(self) -> bool:
        return "betas" in self._group()

    @torch.no_grad()
    def observe(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        world = world_size(self.process_group)
        if world > 1:  # DDP: fold the global batch's gradient, the mean of the ranks' (see SNFS)
            dy, x = rows_of_every_rank(dy, self.process_group), rows_of_every_rank(x, self.process_group)
        group = self._group()
        first = self.steps == 0
        for r0, g in grad_row_chunks(self.layer.layout, dy, x):
            g = g.float() if world == 1 else g.float().div_(world)
            rows = slice(r0, r0 + g.shape[0])
            m = self.m[rows]
            if self.v is not None:
                beta1, beta2 = group["betas"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                self.v[rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            elif first:
                m.copy_(g)  # torch's SGD starts its buffer at the first gradient
            else:
                m.mul_(group.get("momentum", 0.0)).add_(g, alpha=1 - group.get("dampening", 0.0))
            del g  # before the next chunk is computed
        self.steps += 1

    def scores(self) -> torch.Tensor:
        """Momentum magnitude of every position: |m|, or |m| / (sqrt(v) + 1e-8) for Adam."""
        return self.m.abs() if self.v is None else self.m.abs() / (self.v.sqrt() + 1e-8)

    def state_dict(self) -> dict:
        return {"m": self.m.clone(), "v": None if self.v is None else self.v.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.m.copy_(state["m"])
        if self.v is not None:
            self.v.copy_(state["v"])
        self.steps = state["steps"]


@dataclass(frozen=True)
class SNFS(Policy):
    """Sparse momentum (Dettmers & Zettlemoyer 2019).

    At ``delta_t`` intervals until ``t_end``: every snfs layer drops the ``floor(n * p_t)`` kept weights
    of smallest ``|w|`` (``p_t = prune_rate / 2 * (1 + cos(pi * t / T_end))``); the total dropped is
    redistributed across layers in proportion to each layer's mean momentum magnitude over its kept
    weights (largest remainder), and every layer grows its share at the positions of largest momentum
    magnitude (ties: lower flat index). Just-dropped positions compete with fresh ones (``regrow_dropped=True``,
    the default, as the reference's regrowth by momentum); with ``regrow_dropped=False`` shares and growth
    go to fresh positions first, and just-dropped ones only take what no layer has fresh room for.
    Momentum is SGD's buffer, or Adam's ``m / (sqrt(v) + 1e-8)``. Growing by momentum needs the
    momentum of weights that do not exist yet, so snfs keeps a dense momentum shadow and computes the
    dense gradient at every step: the one policy that holds O(out x in) memory.

    Under torch.distributed (DDP) every backward gathers the layer's ``dY`` and ``X`` from every rank
    (``B x (out + in)`` values per rank) and folds their mean gradient, as DDP averages gradients, so the
    shadow is the global batch's on every rank, bit for bit the same, with SGD or Adam, and a checkpoint
    of any rank's shadow is the shadow. It is the one policy that communicates at ordinary steps: its
    momentum folds every step's dense gradient (the algorithm's), and averaging the ranks' shadows at
    updates instead would be exact for ``m`` only (Adam's ``v`` is of squares) and leave rank-local
    shadows in checkpoints between updates.
    """

    name: ClassVar[str] = "snfs"
    changes_density: ClassVar[bool] = True
    delta_t: int = 100
    prune_rate: float = 0.5
    t_end: float = 0.75
    regrow_dropped: bool = True

    def __post_init__(self) -> None:
        check_schedule(self)
        check_fraction(self, "prune_rate", "initial prune rate")
        check_regrow(self)

    def initial_spec(self, target, shape: tuple[int, int]):
        if not isinstance(target, Unstructured):
            raise SpecError(
                f"snfs moves weights between layers, so layer densities change: it needs unstructured specs "
                f"such as 90%; got {target}"
            )
        return target

    def is_update_step(self, t: int, total_steps: int) -> bool:
        return is_update_step(t, self.delta_t, self.t_end, total_steps)

    def drop_fraction(self, t: int, total_steps: int) -> float:
        return cosine_drop_fraction(t, self.prune_rate, self.t_end, total_steps)

    def layer_state(self, layer: SparseLayer, optimizer) -> MomentumShadow:
        return MomentumShadow(layer, optimizer)

    def arm(self, layer: SparseLayer, ctx: Context, state: MomentumShadow) -> Capture:
        return state  # the shadow sees every backward; the drop is decided at the update

    @classmethod
    @torch.no_grad()
    def update(
        cls, due: Mapping[str, SparseLayer], captures: Mapping[str, Capture | None], ctx: Context
    ) -> dict[str, Change | str]:
        """One sparse-momentum update over every snfs layer due at this step."""
        t, total = ctx.t, ctx.total_steps
        plans = {}
        for name, layer in due.items():
            scores = captures[name].scores()
            weights = drop_scores(layer.layout, layer.whole_values())
            if not (bool(torch.isfinite(scores).all()) and bool(torch.isfinite(weights).all())):
                return {name: "a NaN or Inf weight or momentum"}  # no snfs layer moves this time
            kept = layer.positions()
            dropped = choose_drops(weights, n_drop_for(layer.layout, layer.policy.drop_fraction(t, total)))
            survives = survivor_mask(kept, dropped)
            share = float(scores.reshape(-1)[kept].mean()) if kept.numel() else 0.0
            plans[name] = (kept, dropped, survives, share, scores)
        names = list(plans)
        n_total = [due[n].layout.out_features * due[n].layout.in_features for n in names]
        survivors = [int(plans[n][2].sum()) for n in names]
        shares = [plans[n][3] for n in names]
        total_dropped = sum(int(plans[n][1].numel()) for n in names)
        room = [n_total[i] - survivors[i] for i in range(len(names))]  # fresh positions plus the just-dropped
        if any(due[n].policy.regrow_dropped for n in names):
            grants = redistribute(total_dropped, shares, room)
        else:  # fresh positions first: a full layer cannot take back what it dropped while others have room
            fresh = [n_total[i] - int(plans[n][0].numel()) for i, n in enumerate(names)]
            grants = redistribute(total_dropped, shares, fresh)
            rest = redistribute(total_dropped - sum(grants), shares, [r - g for r, g in zip(room, grants, strict=True)])
            grants = [g + r for g, r in zip(grants, rest, strict=True)]
        changes = {}
        for i, name in enumerate(names):
            kept, dropped, survives, _, scores = plans[name]
            regrow = due[name].policy.regrow_dropped
            grown = _grow_by_momentum(kept, kept[~survives], scores.reshape(-1), grants[i], regrow)
            new_flat, src = remap_positions(kept, survives, grown)
            spec = unstructured_with(n_total[i], new_flat.numel())
            changes[name] = Change(new_flat, src, dropped=int(dropped.numel()), spec=spec)
        return changes


snfs = SNFS()


def redistribute(total: int, shares: list[float], capacity: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``shares`` by largest remainder, no entry above its capacity
    (what a full entry cannot take goes to the others, again by share)."""
    grant = [0] * len(shares)
    open_ = [i for i in range(len(shares)) if capacity[i] > 0]
    left = total
    while left > 0 and open_:
        w = {i: max(0.0, shares[i]) for i in open_}
        if sum(w.values()) <= 0:  # no momentum anywhere: equal shares
            w = dict.fromkeys(open_, 1.0)
        weight = sum(w.values())
        exact = {i: left * w[i] / weight for i in open_}
        add = {i: math.floor(exact[i]) for i in open_}
        order = sorted(open_, key=lambda i: (-(exact[i] - add[i]), i))
        for i in order[: left - sum(add.values())]:
            add[i] += 1
        for i in open_:
            take = min(add[i], capacity[i] - grant[i])
            grant[i] += take
            left -= take
        open_ = [i for i in open_ if grant[i] < capacity[i]]
    return grant


def _grow_by_momentum(
    kept: torch.Tensor, dropped: torch.Tensor, scores: torch.Tensor, grant: int, regrow_dropped: bool
) -> torch.Tensor:
    """The ``grant`` positions of largest momentum magnitude (ties: lower flat index) among those not
    kept before the update; just-dropped positions only fill what those cannot (or compete with
    them when ``regrow_dropped``)."""
    fresh = torch.ones(scores.numel(), dtype=torch.bool, device=kept.device)
    fresh[kept] = False
    tiers = [fresh.nonzero().flatten(), dropped]
    if regrow_dropped:
        tiers = [torch.cat(tiers).sort().values]
    grown = []
    for cand in tiers:
        perm, rank = rank_in_unit(torch.zeros_like(cand), scores[cand], cand)
        grown.append(cand[perm[rank < grant]])
        grant -= grown[-1].numel()
    return torch.cat(grown)
