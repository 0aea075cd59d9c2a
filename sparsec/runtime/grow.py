"""The grow step on generated kernels: exact RigL growth from per-segment candidates.

Where the format's strategy scores whole items (blocks), its kernel scores every item of the grid
and the host selects. Otherwise it runs ``grow_topk``: every segment (``Launcher.grow_segment``
wide: a group, or a row's column tile) keeps its ``kc`` best eligible positions. The host then
takes each unit's ``lost[u]`` best. That is exact when no *full* segment (one that kept ``kc``
positions) had its last kept position chosen: then every position it left out ranks below the
unit's cut. Otherwise ``kc`` doubles and the kernel runs again; at ``kc`` = segment width nothing
is left out, so the loop ends. Where a segment is a whole unit (N:M groups) the first run keeps
``kc >= lost[u]`` of each unit and is exact: one pass. Worst case elsewhere (rows or the layer made of
many segments, every segment's last candidate chosen): ``log2(segment width / initial kc) + 1`` runs of
the ``|dY^T X|`` product. The argument needs every segment inside one unit (a segment that is
a unit, or units of whole segments); a strategy where segments straddle units
(``Strategy.grows_on_kernel`` false) grows on the CPU path.
"""

from __future__ import annotations

import torch

from sparsec import config
from sparsec.dtypes import KERNEL_TORCH_DTYPES
from sparsec.formats import Layout
from sparsec.formats.base import pow2_at_least
from sparsec.runtime.ops import backend_for, index_plan, kernel_launcher
from sparsec.runtime.selection import GrowSelector, rank_in_unit, score_chunked


def initial_kc(max_lost: int, seg_width: int, unit_size: int) -> int:
    """Candidates per segment for the first run. A segment that is a whole unit (an N:M group) needs
    exactly its unit's regrowth; a unit of many segments (a row, the layer) needs about its share,
    twice over, so the output stays far below the dense gradient (the check catches the rest)."""
    if seg_width >= unit_size:
        need = max_lost
    else:
        need = 2 * -(-max_lost * seg_width // unit_size)
    return min(seg_width, pow2_at_least(max(1, need), floor=1))


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
    seg_width = launcher.grow_segment()
    if seg_width is None:  # one score per item (block) of the grid, selected exactly as on the CPU path
        selector.add_rows(0, launcher.run("grow_scores", plan, dz=dy, x=x))
        return selector
    selector.rows_seen = layout.grid[0]
    if dropped.numel() == 0:
        return selector
    _score_dropped_in_short_units(selector, dy, x)
    lost = selector.fresh_need
    if int(lost.max()) == 0:
        return selector
    # the kernel leaves out every kept position but those flagged (just dropped, when they compete)
    drop_flags = torch.zeros(layout.n_items, dtype=torch.uint8, device=kept.device)
    if regrow_dropped:
        drop_flags[dropped] = 1
    kc = initial_kc(int(lost.max()), seg_width, layout.unit_size)
    # A segment that is a whole unit (an N:M group) kept its kc >= lost[u] best: the first answer is exact.
    one_pass = seg_width >= layout.unit_size
    while True:
        keys = launcher.run("grow_scores", plan, dz=dy, x=x, drop=drop_flags, kc=kc)
        n_out, nseg, _ = keys.shape
        valid = keys >= 0
        rows, segs, slot = valid.nonzero(as_tuple=True)
        k = keys[valid]
        local = seg_width - 1 - (k & 0xFFFFFFFF)
        flat = rows * layout.in_features + segs * seg_width + local
        score = (k >> 32).to(torch.int32).view(torch.float32)
        if not bool(torch.isfinite(score).all()):
            selector.finite = False
            return selector
        unit = flat // layout.unit_size
        perm, rank = rank_in_unit(unit, score, flat)
        chosen = perm[rank < lost[unit[perm]]]
        full = valid[..., -1]  # segments that kept kc positions
        last_chosen = torch.zeros_like(valid)
        last_chosen[rows[chosen], segs[chosen], slot[chosen]] = True
        if one_pass or kc >= seg_width or not bool((full & last_chosen[..., -1]).any()):
            order = flat[chosen].argsort()
            selector.set_result(flat[chosen][order], score[chosen][order])
            return selector
        kc = min(seg_width, kc * 2)


def select_growth(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, regrow_dropped: bool
) -> GrowSelector:
    """A completed ``GrowSelector`` for the grow step: the generated ``grow_scores`` kernel where it applies
    (``kernel_selection``), else chunked torch (``selection.score_chunked``)."""
    selector = kernel_selection(layout, kept, dropped, dy, x, regrow_dropped)
    return selector if selector is not None else score_chunked(layout, kept, dropped, dy, x, regrow_dropped)


def kernel_selection(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, regrow_dropped: bool
) -> GrowSelector | None:
    """Grow selection on the generated ``grow_scores`` kernel (triton, interpret); None on the cpu backend,
    for dtypes without kernels, and where the format's strategy does not grow on a kernel (N:M with a
    non-power-of-two M: its groups straddle the kernel's segments, and the exactness check needs
    segments nested in units)."""
    backend = backend_for(dy)
    if backend == "cpu" or dy.dtype not in KERNEL_TORCH_DTYPES:
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
