"""set: Sparse Evolutionary Training (Mocanu et al. 2018), drop by magnitude, grow at random."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsec.formats import Layout
from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import Capture, Change, Context
from sparsec.policies.decision import growth_change
from sparsec.policies.schedule import Scheduled
from sparsec.runtime.selection import GrowSelector, chunk_item_rows


class RandomGrowth(Capture):
    """The drop SET decided one step ahead; its growth needs no backward."""

    observes = False

    def __init__(self, layout: Layout, kept: torch.Tensor, dropped: torch.Tensor):
        self.layout, self.kept, self.dropped = layout, kept, dropped


@dataclass(frozen=True)
class SET(Scheduled):
    """Sparse Evolutionary Training: drop by magnitude, grow uniformly at random (seeded)."""

    name: ClassVar[str] = "set"

    def capture(self, layer: SparseLayer, kept: torch.Tensor, dropped: torch.Tensor) -> Capture:
        return RandomGrowth(layer.layout, kept, dropped)

    @classmethod
    @torch.no_grad()
    def update(
        cls, due: Mapping[str, SparseLayer], captures: Mapping[str, Capture | None], ctx: Context
    ) -> dict[str, Change | str]:
        changes = {}
        for name, layer in due.items():  # in model order: each layer's draws follow the last one's
            plan, regrow = captures[name], layer.policy.regrow_dropped
            if plan is None:  # not armed by this policy (the layer's policy changed since the updater armed it)
                changes[name] = "no backward ran through the layer since the updater armed it"
                continue
            selector = random_selection(plan.layout, plan.kept, plan.dropped, ctx.generator, regrow)
            changes[name] = growth_change(plan.kept, plan.dropped, selector)
        return changes


set_ = SET()


def random_selection(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator, regrow_dropped: bool = False
) -> GrowSelector:
    """Uniform random grow scores, drawn chunk by chunk from ``generator``."""
    selector = GrowSelector(layout, kept, dropped, regrow_dropped=regrow_dropped)
    step = chunk_item_rows(layout, 4)
    for r0 in range(0, layout.grid[0], step):
        r1 = min(r0 + step, layout.grid[0])
        selector.add_rows(r0, torch.rand(r1 - r0, layout.grid[1], generator=generator).to(kept.device))
    return selector
