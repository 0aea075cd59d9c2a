"""The grow step on generated kernels: exact RigL growth from per-segment candidates, chunk by chunk.

Where the format's strategy scores whole items (blocks), its kernel scores every item of a chunk of
grid rows and the host selects (``GrowSelector.add_rows``). Otherwise it runs ``grow_topk``: every
segment (``Launcher.grow_segment`` wide: a group, or a row's column tile) keeps its ``kc`` best eligible
positions as int64 keys. Launches cover one chunk of output rows at a time, sized so the keys and the
host's work on them fit ``config.grow_chunk_bytes`` (``KEY_BYTES`` per key): the candidates of a
whole layer never exist at once, nor does anything of the dense gradient's size.

Exactness. A unit takes its ``lost[u]`` best; a segment inside that unit contributes at most
``lost[u]`` of them.

- Units of a row or less (N:M groups, fan-in rows): ``kc = min(segment width, lost)`` candidates per
  segment hold every winner, so one run of the ``|dY^T X|`` product is exact, and each chunk's
  units are selected on their own.
- A layer-wide unit (unstructured): ``lost`` can be most of the layer, so the first run keeps about
  twice each segment's share and merges the candidates into a running best ``lost``. A segment that
  kept ``kc`` candidates and had its *last* one chosen may hide more winners (every position it
  left out ranks below its last; a segment whose last was not chosen hides none, because the cut
  only rises as candidates arrive). Only the column tiles of those segments are scored again, with
  every eligible position kept (a launch over the listed tiles only).

Worst case: two runs of the product for a layer-wide unit (the second over the tiles of segments
whose last candidate was chosen: all of them only when every segment's is), one run otherwise.
Working memory: one chunk of keys (the budget, or one tile of ``BLOCK_O`` rows where that is more),
plus the running best of a layer-wide unit (up to twice ``lost`` positions while merging: O(kept)).
The argument needs every segment inside one unit (a segment that is a unit, or units of whole
segments); a strategy where segments straddle units (``Strategy.grows_on_kernel`` false) grows on
the CPU path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sparsec import config
from sparsec.dtypes import KERNEL_TORCH_DTYPES
from sparsec.formats import Layout
from sparsec.formats.base import cdiv, pow2_at_least
from sparsec.runtime.cpp import cpp_grow_layer_wide, cpp_grow_per_unit
from sparsec.runtime.ops import backend_for
from sparsec.runtime.plans import index_plan
from sparsec.runtime.selection import GrowSelector, best_per_row, score_chunked
from sparsec.runtime.strategies import kernel_launcher

# Bytes of a chunk's working memory per key: the int64 key and, at most at once, the host's work on it
# (tests/interpret/test_grow_kernel_memory.py measures it). Units of a row or less: a mask and topk's
# outputs; a layer-wide unit: nonzero's three indices, flat positions, scores and flags.
KEY_BYTES = {"rows": 24, "layer": 96}
SCORE_BYTES = 24  # per block score (float32) and GrowSelector.add_rows' masks and topk over it
LOW = 0xFFFFFFFF  # a key's low 32 bits: its position, counted from the end of its segment or unit
NON_FINITE = 0x7F800000 << 32  # keys at or above: a score of Inf or NaN (scores are >= 0, their bits ordered)


def initial_kc(lost: int, seg_width: int, unit_size: int) -> int:
    """Candidates per segment for the first run over a layer-wide unit: twice a segment's share of the
    unit's ``lost`` and four more (a power of two, at most the segment). Were the winners spread at
    random, a segment would hold more than that with odds below 1e-4, so the second run sees only the
    tiles of rows that really concentrate the gradient."""
    share = -(-lost * seg_width // unit_size)
    return min(seg_width, pow2_at_least(2 * share + 4, floor=1))


def row_chunks(n_rows: int, row_bytes: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """``(r0, r1)`` chunks of rows whose working memory fits ``config.grow_chunk_bytes``, in whole ``align``
    row tiles, one at least whatever the budget (a thinner launch would run the tile's product anyway)."""
    step = max(align, config.grow_chunk_bytes // max(1, row_bytes))
    step -= step % align
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def grow_on_kernels(
    launcher,
    layout: Layout,
    plan,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    regrow_dropped: bool = False,
) -> GrowSelector:
    """A completed ``GrowSelector`` whose ``grown()`` are the positions to grow."""
    selector = GrowSelector(layout, kept, dropped, regrow_dropped=regrow_dropped)
    dy, x = dy.contiguous(), x.contiguous()
    if not (bool(torch.isfinite(dy).all()) and bool(torch.isfinite(x).all())):
        selector.finite = False  # as on the CPU path, a NaN or Inf anywhere skips the update
        selector.rows_seen = layout.grid[0]
        return selector
    seg = launcher.grow_segment()
    if seg is None:  # one score per item (block) of the grid, selected exactly as on the CPU path
        for r0, r1 in row_chunks(layout.grid[0], layout.grid[1] * SCORE_BYTES):
            selector.add_rows(r0, launcher.run("grow_scores", plan, dz=dy, x=x, r0=r0, r1=r1))
        return selector
    selector.rows_seen = layout.grid[0]
    if dropped.numel() == 0:
        return selector
    _score_dropped_in_short_units(selector, dy, x)
    if int(selector.fresh_need.max()) == 0:
        return selector
    # the kernel leaves out every kept position but those flagged (just dropped, when they compete)
    drop = torch.zeros(layout.n_items, dtype=torch.uint8, device=kept.device)
    if regrow_dropped:
        drop[dropped] = 1
    scan = _Scan(launcher, layout, plan, dy, x, drop, seg)
    if layout.unit_size <= layout.in_features:
        found = scan.within_rows(selector.fresh_need)
    else:
        found = scan.layer_wide(int(selector.fresh_need[0]))
    # A score overflowed to Inf at a position the kernel scored: the update is skipped, as on the CPU path
    # (which scores kept positions too; the kernel leaves them out, so an overflow only there goes unseen).
    if found is None:
        selector.finite = False
        return selector
    selector.set_result(*found)
    return selector


class _Scan:
    """The grow_scores runs of one grow step, chunk by chunk of output rows."""

    def __init__(self, launcher, layout: Layout, plan, dy: torch.Tensor, x: torch.Tensor, drop: torch.Tensor, seg: int):
        self.launcher, self.layout, self.plan = launcher, layout, plan
        self.dy, self.x, self.drop, self.seg = dy, x, drop, seg
        self.nseg = cdiv(layout.in_features, seg)
        self.tile = launcher.tile("grow_scores")

    def keys(self, kc: int, r0: int = 0, r1: int | None = None, tiles: torch.Tensor | None = None) -> torch.Tensor:
        """Keys of rows ``r0 .. r1`` (``[rows, segments, kc]``), or of the listed tiles."""
        r1 = self.layout.out_features if r1 is None else r1
        return self.launcher.run(
            "grow_scores", self.plan, dz=self.dy, x=self.x, drop=self.drop, kc=kc, r0=r0, r1=r1, tiles=tiles
        )

    def chunks(self, kc: int, path: str) -> Iterator[tuple[int, int]]:
        return row_chunks(self.layout.out_features, self.nseg * kc * KEY_BYTES[path], self.tile["BLOCK_O"])

    def within_rows(self, lost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One run for units of a row or less: each unit's ``lost[u]`` best, as (ascending flat, score);
        None if a score is not finite."""
        lay, seg = self.layout, self.seg
        unit = lay.unit_size
        per_unit = cdiv(unit, seg)  # segments per unit: 1 for N:M groups, every segment of a row for fan-in
        kc = min(seg, pow2_at_least(int(lost.max()), floor=1))
        take = min(int(lost.max()), per_unit * kc)
        assert unit in (seg, lay.in_features), "units are the segments or the rows"
        shift = None
        if unit != seg:  # a segment's key counts from the segment's end; a row's key from the row's end
            shift = lay.in_features - seg * (torch.arange(self.nseg, device=self.dy.device) + 1)
        flats, scores = [], []
        for r0, r1 in self.chunks(kc, "rows"):
            keys = self.keys(kc, r0, r1)
            if bool((keys >= NON_FINITE).any()):  # any candidate, chosen or not: as the CPU path
                return None
            if shift is not None:
                empty = keys < 0
                keys += shift[None, :, None]
                keys.masked_fill_(empty, -1)
                del empty
            top = keys.view(-1, per_unit * kc).topk(take, dim=1).values  # unique within a unit: exact order
            del keys
            u0 = r0 * lay.in_features // unit
            chosen = (top >= 0) & (torch.arange(take, device=top.device) < lost[u0 : u0 + top.shape[0], None])
            units, _ = chosen.nonzero(as_tuple=True)
            k = top[chosen]
            flat = (u0 + units) * unit + (unit - 1 - (k & LOW))
            order = flat.argsort()
            flats.append(flat[order])
            scores.append(_score_of(k[order]))
        return torch.cat(flats), torch.cat(scores)

    def layer_wide(self, lost: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's ``lost`` best: a first run at about twice each segment's share, then a second over
        the tiles whose segments may hide winners (see the module docstring)."""
        lay, seg, inn = self.layout, self.seg, self.layout.in_features
        kc = initial_kc(lost, seg, lay.unit_size)
        best = _RunningBest(lost, self.dy.device)
        for r0, r1 in self.chunks(kc, "layer"):
            keys = self.keys(kc, r0, r1)
            valid = keys >= 0
            full = valid.all(dim=2)  # the segment kept kc candidates: its last one may hide more
            last = keys.amin(dim=2)
            rows, segs, slot = valid.nonzero(as_tuple=True)
            k = keys[rows, segs, slot]
            is_last = full[rows, segs] & (k == last[rows, segs])
            del keys, valid, full, last, slot
            if not best.add(self.flat_of(r0 + rows, segs, k), _score_of(k), is_last):
                return None
        flat, score, is_last = best.result()
        if kc >= seg:  # every segment kept every eligible position: nothing hides
            return flat, score
        segment = (flat // inn) * self.nseg + flat % inn // seg  # row * nseg + segment in the row
        hiding = torch.unique(segment[is_last])
        if hiding.numel() == 0:
            return flat, score
        # every position of a hiding segment is scored again: its first-run candidates would be duplicates
        again = torch.isin(segment, hiding)
        best = _RunningBest(lost, self.dy.device)
        best.add(flat[~again], score[~again], torch.zeros_like(again[~again]))
        bo, bk = self.tile["BLOCK_O"], self.tile["BLOCK_K"]
        tiles_k, per_tile = cdiv(inn, bk), bk // seg  # column tiles; segments in a tile
        row, s = hiding // self.nseg, hiding % self.nseg
        tiles = torch.unique((row // bo) * tiles_k + s // per_tile)
        tiles = torch.stack([tiles // tiles_k, tiles % tiles_k], dim=1).to(torch.int32)  # (row tile, column tile)
        step = max(1, config.grow_chunk_bytes // (bo * bk * KEY_BYTES["layer"]))  # tiles a launch keeps every key of
        for t0 in range(0, tiles.shape[0], step):
            part = tiles[t0 : t0 + step]
            keys = self.keys(seg, tiles=part)  # [tiles, BLOCK_O, segments in a tile, seg]
            t = part.to(torch.int64)[:, :, None, None]
            at_row = t[:, 0] * bo + torch.arange(bo, device=t.device)[None, :, None]
            at_seg = t[:, 1] * per_tile + torch.arange(per_tile, device=t.device)[None, None, :]
            # a listed tile may hold other segments: their first-run candidates are in hand
            wanted = torch.isin(at_row * self.nseg + at_seg, hiding)
            ti, i, j, slot = ((keys >= 0) & wanted[..., None]).nonzero(as_tuple=True)
            k = keys[ti, i, j, slot]
            rows, segs = at_row[ti, i, 0], at_seg[ti, 0, j]
            del keys, wanted, slot, at_row, at_seg
            if not best.add(self.flat_of(rows, segs, k), _score_of(k), torch.zeros_like(k, dtype=torch.bool)):
                return None
        flat, score, _ = best.result()
        return flat, score

    def flat_of(self, rows: torch.Tensor, segs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return rows * self.layout.in_features + segs * self.seg + (self.seg - 1 - (k & LOW))


def _score_of(k: torch.Tensor) -> torch.Tensor:
    return (k >> 32).to(torch.int32).view(torch.float32)


class _RunningBest:
    """The ``k`` best (score desc, flat asc) of candidates arriving in any order, with a flag each;
    merged when twice ``k`` are held (amortised linear work)."""

    def __init__(self, k: int, device: torch.device):
        self.k, self.device = k, device
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.held = 0
        self.threshold: torch.Tensor | None = None  # the k-th best score so far, once k are held

    def add(self, flat: torch.Tensor, score: torch.Tensor, flag: torch.Tensor) -> bool:
        """False if a score is not finite (the update is skipped)."""
        if not bool(torch.isfinite(score).all()):
            return False
        if self.threshold is not None:  # below the k-th best: never chosen (ties are decided by flat)
            keep = score >= self.threshold
            flat, score, flag = flat[keep], score[keep], flag[keep]
        self.parts.append((flat, score, flag))
        self.held += flat.numel()
        if self.held >= 2 * self.k:
            self._merge()
        return True

    def _merge(self) -> None:
        flat, score, flag = (torch.cat(t) for t in zip(*self.parts, strict=True))
        order = flat.argsort()  # ascending flat: best_per_row gives ties to the lower index
        flat, score, flag = flat[order], score[order], flag[order]
        take = best_per_row(score.view(1, -1), torch.tensor([self.k], device=flat.device)).view(-1)
        self.parts = [(flat[take], score[take], flag[take])]
        self.held = int(take.count_nonzero())
        if self.held == self.k and self.k > 0:
            self.threshold = score[take].min()

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ascending flat, score, flag) of the ``k`` best."""
        if not self.parts:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return empty, empty.float(), empty.bool()
        self._merge()
        return self.parts[0]


def select_growth(
    layout: Layout,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    regrow_dropped: bool,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GrowSelector:
    """A completed ``GrowSelector`` for the grow step: the generated ``grow_scores`` kernel where it applies
    (``kernel_selection``), the fused C++ scan for a layer-wide unit or fan-in rows on the cpp backend
    (``cpp_selection``),
    else chunked torch (``selection.score_chunked``). ``rows``: the layer's int32 compressed rows of ``kept``,
    where its buffers hold them (the fused scan reads them instead of a copy)."""
    selector = kernel_selection(layout, kept, dropped, dy, x, regrow_dropped)
    if selector is None:
        selector = cpp_selection(layout, kept, dropped, dy, x, regrow_dropped, rows)
    if selector is not None:
        return selector
    return score_chunked(layout, kept, dropped, dy, x, regrow_dropped)


def cpp_selection(
    layout: Layout,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    dy: torch.Tensor,
    x: torch.Tensor,
    regrow_dropped: bool,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GrowSelector | None:
    """Grow selection of a layer-wide unit of single weights (unstructured), or of units of one row (fan-in),
    on the cpp backend: one fused C++ scan of ``|dY^T X|`` that keeps the best fresh positions as the product
    leaves the registers (``runtime.cpp.cpp_grow_layer_wide``, ``cpp_grow_per_unit``: a heap per row; nothing
    of the gradient's size is stored, not even a chunk). None elsewhere: other backends, blocks (scored by
    their means), N:M groups (the kernel serves them, but every position of a group that grows must be looked
    at, and its scalar walk measured 1.3-1.5x slower than the chunked GEMMs and per-row kernel at 2:4), a unit
    that must regrow just-dropped positions (nearly dense)."""
    rows_are_units = layout.unit_size == layout.grid[1]
    if backend_for(dy) != "cpp" or layout.item != (1, 1) or not (layout.n_units == 1 or rows_are_units):
        return None
    selector = GrowSelector(layout, kept, dropped, regrow_dropped=regrow_dropped)
    if selector.any_short:
        return None
    stays = None  # kept before the update are not fresh
    if regrow_dropped:  # the just-dropped compete with fresh positions
        stays = torch.ones(kept.numel(), dtype=torch.bool)
        stays[dropped] = False
    with torch.no_grad():
        if layout.n_units == 1:
            k = int(selector.fresh_need[0]) if dropped.numel() else 0
            flat, score, finite = cpp_grow_layer_wide(dy, x, kept, k, stays, rows)
        else:
            need = selector.fresh_need if dropped.numel() else torch.zeros_like(selector.fresh_need)
            flat, score, finite = cpp_grow_per_unit(dy, x, kept, need, layout.unit_size, stays, rows)
    selector.finite = finite
    selector.set_result(flat, score)
    selector.rows_seen = layout.grid[0]
    return selector


def kernel_selection(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, regrow_dropped: bool
) -> GrowSelector | None:
    """Grow selection on the generated ``grow_scores`` kernel (triton, interpret); None on the cpu and cpp
    backends (the chunked selection: torch GEMMs, and on cpp the generated selection kernel for a
    layer-wide unit, ``selection.best_in_row``), for dtypes without
    kernels, and where the format's strategy does not grow on a kernel (N:M with a non-power-of-two M:
    its groups straddle the kernel's segments, and the exactness check needs segments nested in units)."""
    backend = backend_for(dy)
    if backend in ("cpu", "cpp") or dy.dtype not in KERNEL_TORCH_DTYPES:
        return None
    if not layout.format.strategy(layout.spec).grows_on_kernel:
        return None
    launcher = kernel_launcher(layout.key, dy, False, backend)
    plan = index_plan(layout.key, backend, list(layout.encode(kept).values()))
    return grow_on_kernels(launcher, layout, plan, kept, dropped, dy, x, regrow_dropped)


def _score_dropped_in_short_units(selector: GrowSelector, dy: torch.Tensor, x: torch.Tensor) -> None:
    """|dY^T X| at the just-dropped positions of units that must regrow some of them (nearly dense
    units; usually none): one dot product per position, ranked only against each other, a chunk of
    positions at a time within ``config.grow_chunk_bytes``."""
    if not selector.any_short:  # always so when just-dropped positions compete with fresh ones
        return
    flat = selector.dropped_flat
    flat = flat[selector.short[flat // selector.layout.unit_size] > 0]
    inn = selector.layout.in_features
    step = max(1, config.grow_chunk_bytes // (dy.shape[0] * 8))  # two fp32 gathers per position
    for i in range(0, flat.numel(), step):
        part = flat[i : i + step]
        score = (dy[:, part // inn].float() * x[:, part % inn].float()).sum(0).abs()
        if not bool(torch.isfinite(score).all()):
            selector.finite = False
        selector.note_dropped(part, score)
