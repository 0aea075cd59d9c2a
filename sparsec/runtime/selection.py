"""Grow selection chunk by chunk, so the dense gradient never exists in memory.

The drop of an update is decided before its backward, so each unit's regrowth count ``lost[u]`` is
known while the gradient is scanned. ``GrowSelector`` takes item scores a chunk of rows at a time and
keeps only the ``lost[u]`` best eligible positions of each unit (for a layer-wide unit: the best
``n_drop`` seen so far), plus the scores of just-dropped positions in the rare units that must regrow
some of them. ``grad_row_chunks`` yields ``dY^T X`` one chunk of output rows at a time within
``config.grow_chunk_bytes`` (the one chunk formula: ``chunk_item_rows``), for the CPU backend's grow step
(``score_chunked``; ``runtime.grow`` runs the kernels) and for the policies that scan the gradient
themselves (srigl, snfs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sparsec import config
from sparsec.formats import Layout, item_scores
from sparsec.runtime.cpp import cpp_best_in_row, cpp_best_per_row
from sparsec.runtime.ops import backend_for


def rank_in_unit(
    unit: torch.Tensor, score: torch.Tensor, flat: torch.Tensor, descending: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order by (unit asc, score desc or asc, flat asc) and every entry's rank inside its unit."""
    perm = flat.argsort(stable=True)
    perm = perm[score[perm].argsort(descending=descending, stable=True)]
    perm = perm[unit[perm].argsort(stable=True)]
    u = unit[perm]
    return perm, torch.arange(u.numel(), device=u.device) - torch.searchsorted(u, u)


def best_in_row(scores: torch.Tensor, k: int, floor: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending indices of the ``k`` largest entries of the 1-D ``scores`` above ``floor`` (and above
    -inf), ties to the lower index: ``best_per_row`` of one row, as indices. On the cpp backend, float32
    scores go to the generated selection kernel (a radix select: linear work, no copy of the scores),
    which never takes NaN where torch ranks it first; the selector discards a step with a non-finite
    score either way (``GrowSelector.finite``)."""
    if scores.dtype == torch.float32 and not scores.is_cuda and backend_for(scores) == "cpp":
        return cpp_best_in_row(scores, k, -torch.inf if floor is None else float(floor))
    if floor is not None:
        scores = torch.where(scores > floor, scores, -torch.inf)
    return best_per_row(scores.view(1, -1), torch.tensor([k], device=scores.device)).view(-1).nonzero().view(-1)


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


def all_finite(t: torch.Tensor) -> bool:
    """Whether no entry of ``t`` is NaN or infinite: one reduction (its min and max, which NaN propagates
    to), no tensor of flags (``isfinite(t).all()`` took 15x longer on a grow chunk)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class GrowSelector:
    """Picks, unit by unit, the positions to grow.

    Unit ``u`` grows ``lost[u]`` positions: as many as it lost, or ``need[u]`` (only for units no wider
    than a row: srigl's redistribution). It takes the largest scores among its *fresh* positions, those
    not kept before the update, so an update that drops something always changes the mask; a unit
    with fewer fresh positions than it must grow (a nearly dense one) takes them all and regrows its
    best just-dropped positions for the rest. With ``regrow_dropped=True`` just-dropped positions
    compete with fresh ones instead (google-research/rigl's reference behaviour). Ties go to the lower
    flat index either way.
    """

    def __init__(
        self,
        layout: Layout,
        kept: torch.Tensor,
        dropped: torch.Tensor,
        need: torch.Tensor | None = None,
        regrow_dropped: bool = False,
    ):
        self.layout, self.kept = layout, kept
        self.dropped_flat = kept[dropped]  # ascending: dropped slots are ascending
        assert need is None or layout.unit_size <= layout.grid[1]
        self.need, self.regrow_dropped = need, regrow_dropped
        lost = need if need is not None else self._per_unit(self.dropped_flat)
        if regrow_dropped:
            self.fresh_need = lost
        else:
            self.fresh_need = torch.minimum(lost, layout.unit_size - self._per_unit(kept))
        self.short = lost - self.fresh_need  # regrown from the unit's just-dropped positions
        self.any_short = bool((self.short > 0).any())  # some unit regrows just-dropped positions
        self.finite = True
        self.rows_seen = 0
        self._flat: list[torch.Tensor] = []
        self._score: list[torch.Tensor] = []
        self._dropped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (flat, score) in short units
        self._buffered = 0  # layer-wide unit: candidates held since the last merge
        self._threshold: torch.Tensor | None = None  # layer-wide unit: the k-th best score so far

    def _per_unit(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.bincount(flat // self.layout.unit_size, minlength=self.layout.n_units)

    def add_rows(self, row0: int, scores: torch.Tensor) -> None:
        """Take item scores for item-grid rows ``row0 .. row0 + scores.shape[0]`` (overwritten in place)."""
        layout, cols = self.layout, self.layout.grid[1]
        if not all_finite(scores):
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
        scores[self.kept[k_lo:k_hi] - base] = -torch.inf  # kept before the update: not fresh
        if self.regrow_dropped:
            scores[dropped_local] = dropped_scores  # just dropped: eligible again
        elif self.any_short:
            self.note_dropped(dropped_local + base, dropped_scores)
        unit = min(layout.unit_size, scores.numel())
        per_unit = scores.view(-1, unit)
        if layout.unit_size > unit:  # a layer-wide unit spanning chunks
            self._add_layer_wide(base, per_unit)
            return
        first = base // unit
        need = self.fresh_need[first : first + per_unit.shape[0]]
        if per_unit.dtype == torch.float32 and not per_unit.is_cuda and backend_for(per_unit) == "cpp":
            # the generated kernel: the same choice as indices, NaN never taken (a non-finite step is discarded)
            at = cpp_best_per_row(per_unit, need)
            self._flat.append(base + at)
            self._score.append(per_unit.view(-1)[at])
            return
        take = best_per_row(per_unit, need)
        rows, cols_in_unit = take.nonzero(as_tuple=True)  # row-major: ascending flat index
        self._flat.append(base + rows * unit + cols_in_unit)
        self._score.append(per_unit[take])

    def set_result(self, flat: torch.Tensor, score: torch.Tensor) -> None:
        """Take the fresh positions to grow, chosen elsewhere (the grow kernel's exact selection):
        ascending ``flat`` and their scores; replaces anything ``add_rows`` took."""
        self._flat, self._score = [flat], [score]

    def note_dropped(self, flat: torch.Tensor, score: torch.Tensor) -> None:
        """Grow scores of just-dropped positions (ascending ``flat``); only short units keep them."""
        keep = self.short[flat // self.layout.unit_size] > 0
        self._dropped.append((flat[keep], score[keep]))

    def _add_layer_wide(self, base: int, scores: torch.Tensor) -> None:
        # Keep the best k seen so far. A later chunk's flat indices are larger, so on a tie it loses:
        # only scores strictly above the current k-th best can still enter.
        k = int(self.fresh_need[0])
        cols = best_in_row(scores.view(-1), k, self._threshold)
        self._flat.append(base + cols)
        self._score.append(scores.view(-1)[cols])
        self._buffered += cols.numel()
        if self._buffered >= 2 * k:  # merge rarely: amortised linear work
            self._merge()

    def _merge(self) -> None:
        # Earlier chunks hold smaller flat indices and each list is in ascending flat order, so the
        # concatenation is too, and best_per_row's tie rule (lower index first) stays exact.
        flat, score = torch.cat(self._flat), torch.cat(self._score)
        k = int(self.fresh_need[0])
        take = best_in_row(score, k)
        self._flat, self._score = [flat[take]], [score[take]]
        self._buffered = take.numel()
        if self._buffered == k and k > 0:
            self._threshold = self._score[0].min()

    def grown(self) -> torch.Tensor:
        """Flat positions to grow (ascending); regrown just-dropped positions among them."""
        if self.layout.unit_size > self.layout.grid[1] and len(self._flat) > 1:
            self._merge()
        if len(self._flat) > 1:
            grown = torch.cat(self._flat)
        else:  # one part is handed over as it is: no copy
            grown = self._flat[0] if self._flat else self.kept.new_empty(0)
        if self.any_short and self._dropped:
            flat = torch.cat([f for f, _ in self._dropped])
            score = torch.cat([s for _, s in self._dropped])
            unit = flat // self.layout.unit_size
            perm, rank = rank_in_unit(unit, score, flat)
            grown = torch.cat([grown, flat[perm[rank < self.short[unit[perm]]]]]).sort().values
        return grown

    @property
    def complete(self) -> bool:
        return self.rows_seen == self.layout.grid[0]


def chunk_item_rows(layout: Layout, score_bytes: int) -> int:
    """Item rows per chunk so that a chunk's working memory fits ``config.grow_chunk_bytes``.

    The one chunk formula of every ``|dY^T X|`` scan (``grad_row_chunks``) and of SET's random scores.
    It allows ``score_bytes + 20`` bytes per dense score, which bounds each user's working memory:

    - CPU grow scoring (``score_chunked``) and srigl's regrowth pass (``GrowSelector.add_rows``): the
      score, ``topk``'s value and int64 index when a unit keeps most of a chunk, and ``best_per_row``'s
      boolean masks and int32 cumsum;
    - srigl's saliency pass: the score, ``kthvalue``'s working copy of one long row and the same masks;
    - snfs's momentum shadow: the product and at most a float32 copy of it (``m``, ``v`` update in place).
    """
    row_bytes = layout.item[0] * layout.in_features * (score_bytes + 20)
    return max(1, config.grow_chunk_bytes // row_bytes)


def grad_row_chunks(layout: Layout, dy: torch.Tensor, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(r0, dY^T X)`` for item rows ``r0 ..`` of ``layout``'s grid, one chunk within the budget at a time.

    The dense weight gradient, signed, a chunk of output rows (``item[0]`` per item row) at a time.
    The generator keeps no reference to a chunk it yielded: a caller that drops its own (``del``)
    before asking for the next holds one chunk at a time.
    """
    step, bh = chunk_item_rows(layout, dy.element_size()), layout.item[0]
    for r0 in range(0, layout.grid[0], step):
        yield r0, dy[:, r0 * bh : (r0 + step) * bh].t() @ x


def score_chunked(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, regrow_dropped: bool
) -> GrowSelector:
    """The CPU path: ``|dY^T X|`` chunk by chunk of output rows in torch, into a completed selector."""
    selector = GrowSelector(layout, kept, dropped, regrow_dropped=regrow_dropped)
    with torch.no_grad():
        for r0, grad_rows in grad_row_chunks(layout, dy, x):
            selector.add_rows(r0, item_scores(layout, grad_rows.abs_()))
            del grad_rows  # before the next chunk is computed
    return selector
