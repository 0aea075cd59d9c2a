"""Grow candidates collected chunk by chunk, so the dense gradient never exists in memory.

A grow step needs, for every unit, the best ``cap`` scores among positions not kept now, and the
score of every kept item (a just-dropped item may be regrown). ``CandidateCollector`` takes item
scores a chunk of rows at a time and keeps only that; ``GrowCapture`` feeds it ``|dY^T X|`` from
a layer's backward, one chunk of output rows at a time, within ``config.grow_chunk_bytes``.
"""

from __future__ import annotations

import torch

from sparsec import config
from sparsec.nn.formats import Layout
from sparsec.policies.decision import item_scores


class CandidateCollector:
    def __init__(self, layout: Layout, kept: torch.Tensor, cap: int, dtype=torch.float32):
        self.layout, self.kept, self.cap = layout, kept, cap
        self.kept_scores = torch.zeros(kept.numel(), dtype=dtype, device=kept.device)
        self.finite = True
        self.rows_seen = 0
        self._flat: list[torch.Tensor] = []
        self._score: list[torch.Tensor] = []

    def add_rows(self, row0: int, scores: torch.Tensor) -> None:
        """Take item scores for item-grid rows ``row0 .. row0 + scores.shape[0]`` (overwritten in place)."""
        cols = self.layout.grid[1]
        if not bool(torch.isfinite(scores).all()):
            self.finite = False
        base = row0 * cols
        scores = scores.reshape(-1).to(self.kept_scores.dtype)  # a copy only when the dtype differs
        lo, hi = torch.searchsorted(self.kept, torch.tensor([base, base + scores.numel()], device=self.kept.device))
        local = self.kept[lo:hi] - base
        self.kept_scores[lo:hi] = scores[local]
        self.rows_seen += scores.numel() // cols
        if self.cap == 0:
            return
        scores[local] = -torch.inf  # kept positions are not candidates here
        unit = min(self.layout.unit_size, scores.numel())
        per_unit = scores.view(-1, unit)
        top, idx = per_unit.sort(dim=1, descending=True, stable=True)  # stable: ties keep lower index
        top, idx = top[:, : self.cap], idx[:, : self.cap]
        flat = base + torch.arange(per_unit.shape[0], device=idx.device)[:, None] * unit + idx
        keep = top > -torch.inf  # a unit with fewer free positions than cap
        self._flat.append(flat[keep])
        self._score.append(top[keep])
        del top, idx, flat, keep  # free the chunk's full sort before merging
        if self.layout.unit_size > unit:  # a layer-wide unit spans chunks: keep only the best cap so far
            self._merge()

    def _merge(self) -> None:
        # Both lists are ordered by (score desc, flat asc) and every earlier chunk's flat indices are
        # smaller, so one stable sort by score of [earlier, new] keeps that order.
        flat, score = torch.cat(self._flat), torch.cat(self._score)
        best = score.sort(descending=True, stable=True).indices[: self.cap]
        self._flat, self._score = [flat[best]], [score[best]]

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._flat:
            empty = torch.empty(0, dtype=torch.int64, device=self.kept.device)
            return empty, self.kept_scores.new_empty(0)
        return torch.cat(self._flat), torch.cat(self._score)

    @property
    def complete(self) -> bool:
        return self.rows_seen == self.layout.grid[0]


def chunk_item_rows(layout: Layout, bytes_per_score: int) -> int:
    """Item rows per chunk so one chunk of dense scores fits ``config.grow_chunk_bytes``."""
    row_bytes = layout.item[0] * layout.in_features * bytes_per_score
    return max(1, config.grow_chunk_bytes // row_bytes)


class GrowCapture:
    """Armed on a layer for one backward: collects ``|dY^T X|`` candidates chunk by chunk."""

    def __init__(self, layout: Layout, kept: torch.Tensor, cap: int):
        self.layout, self.kept, self.cap = layout, kept, cap
        self.collector: CandidateCollector | None = None

    def observe(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        # Each backward replaces the last: the grow step uses the latest gradient.
        layout = self.layout
        collector = CandidateCollector(layout, self.kept, self.cap, dtype=dy.dtype)
        step = chunk_item_rows(layout, dy.element_size())
        bh = layout.item[0]
        with torch.no_grad():
            for r0 in range(0, layout.grid[0], step):
                r1 = min(r0 + step, layout.grid[0])
                grad_rows = (dy[:, r0 * bh : r1 * bh].t() @ x).abs_()  # [rows, in]: this chunk only
                collector.add_rows(r0, item_scores(layout, grad_rows))
                del grad_rows
        self.collector = collector


def random_candidates(layout: Layout, kept: torch.Tensor, cap: int, generator: torch.Generator) -> CandidateCollector:
    """Uniform random grow scores (SET), drawn chunk by chunk from ``generator``."""
    collector = CandidateCollector(layout, kept, cap, dtype=torch.float32)
    step = chunk_item_rows(layout, 4)
    for r0 in range(0, layout.grid[0], step):
        r1 = min(r0 + step, layout.grid[0])
        collector.add_rows(r0, torch.rand(r1 - r0, layout.grid[1], generator=generator).to(kept.device))
    return collector
