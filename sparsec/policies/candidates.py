"""What a policy arms on a layer for its grow step, and SET's random scores.

``GrowCapture`` receives the update step's ``dY`` and ``X`` from the layer's backward and hands them
to the backend's grow selection (``runtime.grow.select_growth``: generated kernels on triton and
interpret, chunked torch on cpu); ``random_selection`` draws SET's scores chunk by chunk.
"""

from __future__ import annotations

import torch

from sparsec.formats import Layout
from sparsec.runtime.grow import select_growth
from sparsec.runtime.selection import GrowSelector, chunk_item_rows


class GrowCapture:
    """Armed on a layer for one backward: selects grow positions from ``|dY^T X|`` chunk by chunk."""

    def __init__(self, layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, regrow_dropped: bool = False):
        self.layout, self.kept, self.dropped = layout, kept, dropped
        self.regrow_dropped = regrow_dropped
        self.selector: GrowSelector | None = None

    def observe(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        # Each backward replaces the last: the grow step uses the latest gradient.
        self.selector = select_growth(self.layout, self.kept, self.dropped, dy, x, self.regrow_dropped)


def random_selection(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator, regrow_dropped: bool = False
) -> GrowSelector:
    """Uniform random grow scores (SET), drawn chunk by chunk from ``generator``."""
    selector = GrowSelector(layout, kept, dropped, regrow_dropped=regrow_dropped)
    step = chunk_item_rows(layout, 4)
    for r0 in range(0, layout.grid[0], step):
        r1 = min(r0 + step, layout.grid[0])
        selector.add_rows(r0, torch.rand(r1 - r0, layout.grid[1], generator=generator).to(kept.device))
    return selector
