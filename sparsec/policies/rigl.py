"""rigl: the Rigged Lottery (Evci et al. 2020), drop by magnitude, grow where |dense gradient| is largest.

The armed update step's backward hands ``dY`` and ``X`` to ``GrowCapture``, which selects the
regrowth there on the backend's grow path (``runtime.grow.select_growth``: generated kernels on triton
and interpret, chunked torch on cpu); the dense gradient is never built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsec.formats import Layout
from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import Capture, Change, Context, StepActivations
from sparsec.policies.decision import growth_change
from sparsec.policies.schedule import Scheduled
from sparsec.runtime.grow import select_growth
from sparsec.runtime.selection import GrowSelector


class GrowCapture(StepActivations):
    """Armed on a layer for the update step: selects grow positions from ``|dY^T X|`` of the step's
    backwards (all of them, see ``StepActivations``), chunk by chunk, when the update asks."""

    def __init__(
        self,
        layout: Layout,
        kept: torch.Tensor,
        dropped: torch.Tensor,
        regrow_dropped: bool = True,
        rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.layout, self.kept, self.dropped = layout, kept, dropped
        self.regrow_dropped = regrow_dropped
        self.rows = rows  # the layer's compressed rows of ``kept`` where its format holds them (no copy)

    @property
    def selector(self) -> GrowSelector | None:
        """The completed selection (None: no backward ran through the layer)."""
        pair = self.activations()
        if pair is None:
            return None
        return select_growth(self.layout, self.kept, self.dropped, *pair, self.regrow_dropped, rows=self.rows)


@dataclass(frozen=True)
class RigL(Scheduled):
    """Rigged Lottery: drop by magnitude, grow where |dense gradient| is largest."""

    name: ClassVar[str] = "rigl"

    def capture(self, layer: SparseLayer, kept: torch.Tensor, dropped: torch.Tensor) -> Capture:
        rows = layer.layout.format.compressed_rows(layer.layout, layer.index_buffers())
        return GrowCapture(layer.layout, kept, dropped, self.regrow_dropped, rows)

    @classmethod
    @torch.no_grad()
    def update(
        cls, due: Mapping[str, SparseLayer], captures: Mapping[str, Capture | None], ctx: Context
    ) -> dict[str, Change | str]:
        changes = {}
        for name in due:
            capture = captures[name]
            selector = None if capture is None else capture.selector  # computed once, here
            if capture is not None:
                capture.release()  # the selection holds what the change needs
            if selector is None or not selector.complete:
                changes[name] = "no backward ran through the layer since the updater armed it"
            else:
                changes[name] = growth_change(capture.kept, capture.dropped, selector)
        return changes


rigl = RigL()
