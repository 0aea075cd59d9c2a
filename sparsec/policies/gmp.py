"""gmp: gradual magnitude pruning (Zhu & Gupta 2017) on the cubic schedule; storage shrinks with it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsec.errors import SpecError
from sparsec.formats import Layout, make_layout
from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import Capture, Change, Context, Policy
from sparsec.policies.decision import drop_scores, survivor_mask
from sparsec.runtime.selection import rank_in_unit
from sparsec.spec.policy import check_schedule


@dataclass(frozen=True)
class GMP(Policy):
    """Gradual magnitude pruning (Zhu & Gupta 2017): from ``s_0`` to the layer's target sparsity ``s_f``.

    At ``t = t0 + k * delta_t`` for ``t0 = t_start * total`` up to ``t1 = t_end * total`` the layer is
    pruned by magnitude to ``s_t = s_f + (s_0 - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` (the cubic
    schedule with ``n * delta_t = t1 - t0``); storage shrinks with it. Nothing ever grows back.
    """

    name: ClassVar[str] = "gmp"
    changes_density: ClassVar[bool] = True
    delta_t: int = 100
    s_0: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.75

    def __post_init__(self) -> None:
        check_schedule(self)
        if not (isinstance(self.s_0, (int, float)) and 0.0 <= self.s_0 < 1.0):
            raise SpecError(f"gmp: s_0={self.s_0!r} must be in [0, 1) (the sparsity training starts from)")
        if not (0.0 <= self.t_start < self.t_end <= 1.0):
            raise SpecError(
                f"gmp: need 0 <= t_start < t_end <= 1 (fractions of total_steps), got {self.t_start}, {self.t_end}"
            )

    def initial_spec(self, target, shape: tuple[int, int]):
        if not target.has_free_sparsity:
            raise SpecError(
                f"gmp prunes toward a sparsity, but spec {target} fixes the density; use a spec with a sparsity "
                f"such as 90%, block(16x16, 90%) or fanin(90%)"
            )
        return dataclasses.replace(target, sparsity=min(self.s_0, target.sparsity))

    def window(self, total_steps: int) -> tuple[float, float]:
        return self.t_start * total_steps, self.t_end * total_steps

    def is_update_step(self, t: int, total_steps: int) -> bool:
        """Every ``delta_t`` steps from ``t0``, and once more at the first step >= ``t1`` (the final sparsity)."""
        t0, t1 = self.window(total_steps)
        return t >= 1 and ((t0 <= t <= t1 and (t - math.ceil(t0)) % self.delta_t == 0) or t == math.ceil(t1))

    def sparsity_at(self, t: int, total_steps: int, final: float) -> float:
        """The cubic schedule: ``s_0`` at ``t0``, ``final`` from ``t1`` on."""
        t0, t1 = self.window(total_steps)
        progress = min(1.0, max(0.0, (t - t0) / (t1 - t0)))
        return final + (min(self.s_0, final) - final) * (1.0 - progress) ** 3

    @classmethod
    @torch.no_grad()
    def update(
        cls, due: Mapping[str, SparseLayer], captures: Mapping[str, Capture | None], ctx: Context
    ) -> dict[str, Change | str]:
        """Prune each layer by magnitude to the schedule's sparsity; storage and optimizer state shrink."""
        changes = {}
        for name, layer in due.items():
            target, layout = layer.target_spec, layer.layout
            sparsity = layer.policy.sparsity_at(ctx.t, ctx.total_steps, target.sparsity)
            spec = dataclasses.replace(target, sparsity=sparsity)
            new_layout = make_layout(spec, layout.out_features, layout.in_features, name)
            if new_layout.n_items >= layout.n_items:  # same counts: only the recorded sparsity moves on
                changes[name] = Change(None, None, spec=spec)
                continue
            scores = drop_scores(layout, layer.whole_values())
            if not bool(torch.isfinite(scores).all()):
                changes[name] = "a NaN or Inf weight"
                continue
            flat, src = prune_to(layout, new_layout, layer.positions(), scores)
            pruned = layout.n_items - new_layout.n_items
            changes[name] = Change(flat, src, dropped=pruned, spec=spec, pruned=pruned)
        return changes


gmp = GMP()


def prune_to(layout: Layout, new_layout: Layout, kept: torch.Tensor, drop_score: torch.Tensor):
    """Magnitude pruning to ``new_layout``'s counts: every unit drops its smallest items (ties: lower
    flat index first). Returns the new sorted positions and their old slots."""
    assert (new_layout.grid, new_layout.unit_size) == (layout.grid, layout.unit_size)
    drop = layout.kept_per_unit - new_layout.kept_per_unit
    perm, rank = rank_in_unit(kept // layout.unit_size, drop_score, kept, descending=False)
    src = survivor_mask(kept, perm[rank < drop]).nonzero().flatten()
    flat = kept[src]
    new_layout.check_positions(flat, what="pruned mask")
    return flat, src
