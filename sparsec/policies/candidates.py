"""Grow selection chunk by chunk, so the dense gradient never exists in memory.

The drop of an update is decided before its backward (``decision``), so each unit's regrowth
count ``lost[u]`` is known while the gradient is scanned. ``GrowSelector`` takes item scores a
chunk of rows at a time and keeps only the ``lost[u]`` best eligible positions of each unit (for a
layer-wide unit: the best ``n_drop`` seen so far). ``GrowCapture`` feeds it ``|dY^T X|`` from a
layer's backward, one chunk of output rows at a time, within ``config.grow_chunk_bytes``.
"""

from __future__ import annotations

import torch

from sparsec import config
from sparsec.nn.formats import Layout
from sparsec.policies.decision import item_scores


def best_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``k[r]`` largest finite entries of each row ``r``; ties go to the lower column.

    A threshold from ``topk`` instead of a full sort: linear work and a few bytes per score.
    """
    k = k.clamp(max=scores.shape[1])
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.shape[0] == 1:  # one long row (a layer-wide unit): quickselect, no sorted output
        threshold = scores.kthvalue(scores.shape[1] - k_max + 1, dim=1, keepdim=True).values
    else:  # many short rows (groups, fan-in rows) with small k: each row's k-th of a sorted topk
        top = scores.topk(k_max, dim=1, sorted=True).values
        threshold = top.gather(1, (k - 1).clamp(min=0)[:, None])
        threshold[k == 0] = torch.inf  # nothing to take in that row
        del top
    above = scores > threshold
    at = scores == threshold
    need = k[:, None] - above.sum(1, keepdim=True)
    if bool((at.sum(1, keepdim=True) > need).any()):  # more ties at the threshold than places left
        at &= at.cumsum(1, dtype=torch.int32) <= need
    return (above | at) & (scores > -torch.inf)


class GrowSelector:
    """Picks, unit by unit, the positions to grow: the best ``lost[u]`` not kept after the drop."""

    def __init__(self, layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, need: torch.Tensor | None = None):
        """``need[u]`` overrides how many positions unit ``u`` grows (default: as many as it lost);
        only for units no wider than a row (srigl's redistribution)."""
        self.layout, self.kept = layout, kept
        self.dropped_flat = kept[dropped]  # ascending: dropped slots are ascending
        assert need is None or layout.unit_size <= layout.grid[1]
        self.need = need
        self.finite = True
        self.rows_seen = 0
        self._flat: list[torch.Tensor] = []
        self._score: list[torch.Tensor] = []
        self._buffered = 0  # layer-wide unit: candidates held since the last merge
        self._threshold: torch.Tensor | None = None  # layer-wide unit: the n_drop-th best score so far

    def add_rows(self, row0: int, scores: torch.Tensor) -> None:
        """Take item scores for item-grid rows ``row0 .. row0 + scores.shape[0]`` (overwritten in place)."""
        layout, cols = self.layout, self.layout.grid[1]
        if not bool(torch.isfinite(scores).all()):
            self.finite = False
        self.rows_seen += scores.shape[0]
        if self.dropped_flat.numel() == 0 and self.need is None:
            return  # nothing dropped: nothing to grow
        base = row0 * cols
        scores = scores.reshape(-1)
        bounds = torch.tensor([base, base + scores.numel()], device=scores.device)
        k_lo, k_hi = torch.searchsorted(self.kept, bounds).tolist()
        d_lo, d_hi = torch.searchsorted(self.dropped_flat, bounds).tolist()
        dropped_local = self.dropped_flat[d_lo:d_hi] - base
        if dropped_local.numel() == 0 and layout.unit_size <= scores.numel() and self.need is None:
            return  # no unit of this chunk lost anything
        dropped_scores = scores[dropped_local]
        scores[self.kept[k_lo:k_hi] - base] = -torch.inf  # kept after the drop: not eligible
        scores[dropped_local] = dropped_scores  # just dropped: eligible again
        unit = min(layout.unit_size, scores.numel())
        per_unit = scores.view(-1, unit)
        if layout.unit_size > unit:  # a layer-wide unit spanning chunks
            self._add_layer_wide(base, per_unit)
            return
        if self.need is not None:
            first = base // unit
            lost = self.need[first : first + per_unit.shape[0]]
        else:
            lost = torch.bincount(torch.div(dropped_local, unit, rounding_mode="floor"), minlength=per_unit.shape[0])
        take = best_per_row(per_unit, lost)
        rows, cols_in_unit = take.nonzero(as_tuple=True)  # row-major: ascending flat index
        self._flat.append(base + rows * unit + cols_in_unit)
        self._score.append(per_unit[take])

    def _add_layer_wide(self, base: int, scores: torch.Tensor) -> None:
        # Keep the best n_drop seen so far. A later chunk's flat indices are larger, so on a tie it
        # loses: only scores strictly above the current n_drop-th best can still enter.
        n_drop = self.dropped_flat.numel()
        if self._threshold is not None:
            scores[scores <= self._threshold] = -torch.inf
        take = best_per_row(scores, torch.tensor([n_drop], device=scores.device)).view(-1)
        (cols,) = take.nonzero(as_tuple=True)
        self._flat.append(base + cols)
        self._score.append(scores.view(-1)[take])
        self._buffered += cols.numel()
        if self._buffered >= 2 * n_drop:  # merge rarely: amortised linear work
            self._merge()

    def _merge(self) -> None:
        # Earlier chunks hold smaller flat indices and each list is in ascending flat order, so the
        # concatenation is too, and best_per_row's tie rule (lower index first) stays exact.
        flat, score = torch.cat(self._flat), torch.cat(self._score)
        n_drop = self.dropped_flat.numel()
        take = best_per_row(score.view(1, -1), torch.tensor([n_drop], device=flat.device)).view(-1)
        self._flat, self._score = [flat[take]], [score[take]]
        self._buffered = int(take.sum())
        if self._buffered == n_drop and n_drop > 0:
            self._threshold = self._score[0].min()

    def grown(self) -> torch.Tensor:
        """Flat positions to grow (ascending); includes just-dropped positions chosen again."""
        if not self._flat:
            return self.kept.new_empty(0)
        if self.layout.unit_size > self.layout.grid[1] and len(self._flat) > 1:
            self._merge()
        return torch.cat(self._flat)

    @property
    def complete(self) -> bool:
        return self.rows_seen == self.layout.grid[0]


def chunk_item_rows(layout: Layout, score_bytes: int) -> int:
    """Item rows per chunk so that a chunk's working memory fits ``config.grow_chunk_bytes``.

    Per dense score: the score, ``topk``'s value and int64 index when a unit keeps most of a chunk,
    and the selection masks of ``best_per_row`` (about ``score_bytes + 20`` bytes).
    """
    row_bytes = layout.item[0] * layout.in_features * (score_bytes + 20)
    return max(1, config.grow_chunk_bytes // row_bytes)


class GrowCapture:
    """Armed on a layer for one backward: selects grow positions from ``|dY^T X|`` chunk by chunk."""

    def __init__(self, layout: Layout, kept: torch.Tensor, dropped: torch.Tensor):
        self.layout, self.kept, self.dropped = layout, kept, dropped
        self.selector: GrowSelector | None = None

    def observe(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        # Each backward replaces the last: the grow step uses the latest gradient.
        from sparsec.runtime.ops import grow_selector  # generated kernels on the triton/interpret backends

        self.selector = grow_selector(self.layout, self.kept, self.dropped, dy, x)
        if self.selector is None:
            self.selector = self._observe_chunked(dy, x)

    def _observe_chunked(self, dy: torch.Tensor, x: torch.Tensor) -> GrowSelector:
        """The CPU path: ``|dY^T X|`` chunk by chunk of output rows in torch."""
        layout = self.layout
        selector = GrowSelector(layout, self.kept, self.dropped)
        step = chunk_item_rows(layout, dy.element_size())
        bh = layout.item[0]
        with torch.no_grad():
            for r0 in range(0, layout.grid[0], step):
                r1 = min(r0 + step, layout.grid[0])
                grad_rows = (dy[:, r0 * bh : r1 * bh].t() @ x).abs_()  # [rows, in]: this chunk only
                selector.add_rows(r0, item_scores(layout, grad_rows))
                del grad_rows
        return selector


def random_selection(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator
) -> GrowSelector:
    """Uniform random grow scores (SET), drawn chunk by chunk from ``generator``."""
    selector = GrowSelector(layout, kept, dropped)
    step = chunk_item_rows(layout, 4)
    for r0 in range(0, layout.grid[0], step):
        r1 = min(r0 + step, layout.grid[0])
        selector.add_rows(r0, torch.rand(r1 - r0, layout.grid[1], generator=generator).to(kept.device))
    return selector
