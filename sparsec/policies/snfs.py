"""snfs: the dense momentum shadow and the cross-layer drop/redistribute/grow update (policies.base.SNFS)."""

from __future__ import annotations

import math

import torch

from sparsec import config
from sparsec.nn.layers import SparseLayer
from sparsec.policies.decision import choose_drops, drop_scores, n_drop_for
from sparsec.policies.optim_state import replace_parameter
from sparsec.runtime.selection import rank_in_unit
from sparsec.spec import unstructured_with


class MomentumShadow:
    """Dense momentum of every weight of one layer, kept like the optimizer keeps it for kept weights.

    Installed as the layer's capture at every step: each backward hands it ``dY`` and ``X``, and it
    folds ``|dY^T X|`` chunk by chunk of output rows into SGD's ``m = beta m + (1 - dampening) g``
    or Adam's ``m``, ``v``. O(out x in) memory by design (see SNFS).
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
        group = self._group()
        first = self.steps == 0
        rows = max(1, config.grow_chunk_bytes // (x.shape[1] * 4 * 3))
        for r0 in range(0, self.m.shape[0], rows):
            g = (dy[:, r0 : r0 + rows].t() @ x).float()
            m = self.m[r0 : r0 + rows]
            if self.v is not None:
                beta1, beta2 = group["betas"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                self.v[r0 : r0 + rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            elif first:
                m.copy_(g)  # torch's SGD starts its buffer at the first gradient
            else:
                m.mul_(group.get("momentum", 0.0)).add_(g, alpha=1 - group.get("dampening", 0.0))
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


@torch.no_grad()
def snfs_update(updater, layers: dict[str, SparseLayer], shadows: dict[str, MomentumShadow]) -> None:
    """One sparse-momentum update over ``layers`` (all snfs layers due at this step)."""
    t, total = updater.t, updater.total_steps
    plans = {}
    for name, layer in layers.items():
        scores = shadows[name].scores()
        weights = drop_scores(layer.layout, layer.values)
        if not (bool(torch.isfinite(scores).all()) and bool(torch.isfinite(weights).all())):
            return updater._skip(name, "a NaN or Inf weight or momentum")
        kept = layer.positions()
        dropped = choose_drops(weights, n_drop_for(layer.layout, layer.policy.drop_fraction(t, total)))
        survives = torch.ones(kept.numel(), dtype=torch.bool, device=kept.device)
        survives[dropped] = False
        share = float(scores.reshape(-1)[kept].mean()) if kept.numel() else 0.0
        plans[name] = (kept, dropped, survives, share, scores)
    names = list(plans)
    n_total = [layers[n].layout.out_features * layers[n].layout.in_features for n in names]
    survivors = [int(plans[n][2].sum()) for n in names]
    shares = [plans[n][3] for n in names]
    total_dropped = sum(int(plans[n][1].numel()) for n in names)
    room = [n_total[i] - survivors[i] for i in range(len(names))]  # fresh positions plus the just-dropped
    if any(layers[n].policy.regrow_dropped for n in names):
        grants = redistribute(total_dropped, shares, room)
    else:  # fresh positions first: a full layer cannot take back what it dropped while others have room
        fresh = [n_total[i] - int(plans[n][0].numel()) for i, n in enumerate(names)]
        grants = redistribute(total_dropped, shares, fresh)
        rest = redistribute(total_dropped - sum(grants), shares, [r - g for r, g in zip(room, grants, strict=True)])
        grants = [g + r for g, r in zip(grants, rest, strict=True)]
    for i, name in enumerate(names):
        layer = layers[name]
        kept, dropped, survives, _, scores = plans[name]
        grown = _grow_by_momentum(kept, kept[~survives], scores.reshape(-1), grants[i], layer.policy.regrow_dropped)
        new_flat = torch.cat([kept[survives], grown]).sort().values
        at = torch.searchsorted(kept, new_flat).clamp(max=kept.numel() - 1)
        src = torch.where(kept[at] == new_flat, at, -1)  # survivors and regrown just-dropped keep their slot
        spec = unstructured_with(n_total[i], new_flat.numel())
        old = layer.set_layout(spec, new_flat, src)
        replace_parameter(updater.optimizer, old, layer.values, src)
        updater.last_changes[name] = int((src < 0).sum())
        updater.last_dropped[name] = int(dropped.numel())


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
