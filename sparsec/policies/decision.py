"""The drop/grow decision, shared by every policy and by the dense ``rigl_step`` function.

Conventions (pinned by tests, stated in the README):

- drop: the ``floor(n_items * f)`` kept items of smallest drop score (|w|, or mean |w| over a
  block) across the layer; ties go to the lower flat index. ``w`` is the weight the update
  step's forward and backward used, as in Algorithm 1 of the RigL paper;
- grow: each unit (layer, N:M group, fan-in row) regrows exactly as many items as it lost, taking
  the largest grow scores among its fresh positions (not kept before the update), so every update
  that drops something changes the mask; a unit with fewer fresh positions than it lost regrows its
  best just-dropped items for the rest. ``regrow_dropped=True`` lets just-dropped items compete with
  fresh ones (google-research/rigl's reference behaviour). Ties go to the lower flat index;
- an item dropped and regrown in one update keeps its slot: its value and optimizer state;
- new items start at zero.

Because the drop is known before the backward of the update step, the grow side only ever keeps
``lost[u]`` candidates per unit while it scans the gradient (``candidates.GrowSelector``).
"""

from __future__ import annotations

import math
import warnings

import torch

from sparsec.errors import ShapeError, SparsecWarning
from sparsec.formats import Layout, item_scores, make_layout
from sparsec.runtime.selection import GrowSelector, rank_in_unit
from sparsec.spec import Spec, parse_spec


def n_drop_for(layout: Layout, drop_fraction: float) -> int:
    return int(math.floor(layout.n_items * drop_fraction))


def drop_scores(layout: Layout, values: torch.Tensor) -> torch.Tensor:
    """Drop score of every kept item in stored order: |w|, or mean |w| over a block."""
    magnitude = values.detach().abs().reshape(layout.n_items, -1)
    return magnitude[:, 0] if magnitude.shape[1] == 1 else magnitude.mean(dim=1)


def choose_drops(drop_score: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Slots of the ``n_drop`` smallest scores, ascending; slots follow flat order, so ties keep the lower."""
    return drop_score.argsort(stable=True)[:n_drop].sort().values


def top_items(layout: Layout, scores: torch.Tensor) -> torch.Tensor:
    """Sorted flat positions of every unit's ``kept_per_unit`` largest item scores (ties: lower index)."""
    flat = torch.arange(scores.numel(), device=scores.device)
    perm, rank = rank_in_unit(flat // layout.unit_size, scores.reshape(-1), flat)
    return perm[rank < layout.kept_per_unit].sort().values


def prune_to(layout: Layout, new_layout: Layout, kept: torch.Tensor, drop_score: torch.Tensor):
    """Magnitude pruning to ``new_layout``'s counts: every unit drops its smallest items (ties: lower
    flat index first). Returns the new sorted positions and their old slots."""
    assert (new_layout.grid, new_layout.unit_size) == (layout.grid, layout.unit_size)
    drop = layout.kept_per_unit - new_layout.kept_per_unit
    perm, rank = rank_in_unit(kept // layout.unit_size, drop_score, kept, descending=False)
    survives = torch.ones(kept.numel(), dtype=torch.bool, device=kept.device)
    survives[perm[rank < drop]] = False
    src = survives.nonzero().flatten()
    flat = kept[src]
    new_layout.check_positions(flat, what="pruned mask")
    return flat, src


def apply_growth(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, grown: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New sorted kept positions and, for each, its old slot (``-1`` for a newly grown item).

    ``dropped`` holds slots of ``kept``; ``grown`` holds flat positions, some of which may be
    just-dropped ones: those keep their slot.
    """
    slots = torch.arange(kept.numel(), device=kept.device)
    survives = torch.ones(kept.numel(), dtype=torch.bool, device=kept.device)
    survives[dropped] = False
    new_flat = torch.cat([kept[survives], grown])
    order = new_flat.argsort()
    new_flat = new_flat[order]
    layout.check_positions(new_flat, what="updated mask")  # exact counts per unit, checked every time
    # a position present before keeps its old slot (survivor, or dropped and regrown)
    at = torch.searchsorted(kept, new_flat).clamp(max=kept.numel() - 1)
    src = torch.where(kept[at] == new_flat, slots[at], -1)
    return new_flat, src


def rigl_step(
    mask: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    drop_fraction: float,
    spec: str | Spec,
    *,
    regrow_dropped: bool = False,
) -> torch.Tensor:
    """One RigL mask update on dense tensors (the reference semantics, for tests and parity).

    ``mask``, ``weight`` and ``grad`` share the dense weight shape (conv weights are seen as
    ``[out, in*kh*kw]``); ``weight`` is the weight that produced ``grad``. Returns the new boolean
    mask; a NaN or Inf score returns ``mask`` unchanged with a warning. ``regrow_dropped`` as for the
    ``rigl`` policy (``True``: google-research/rigl's choice).
    """
    if not (mask.shape == weight.shape == grad.shape):
        raise ShapeError(f"mask {tuple(mask.shape)}, weight {tuple(weight.shape)} and grad {tuple(grad.shape)} differ")
    out = mask.shape[0]
    layout = make_layout(parse_spec(spec), out, mask.numel() // out, "rigl_step")
    kept = layout.item_positions_from_mask(mask)
    w_items = item_scores(layout, weight.reshape(layout.out_features, -1).abs())
    g_items = item_scores(layout, grad.reshape(layout.out_features, -1).abs())
    if not (torch.isfinite(w_items).all() and torch.isfinite(g_items).all()):
        warnings.warn(
            "rigl_step: NaN or Inf in the weight or gradient; the mask is unchanged", SparsecWarning, stacklevel=2
        )
        return mask.clone()
    dropped = choose_drops(w_items.reshape(-1)[kept], n_drop_for(layout, drop_fraction))
    selector = GrowSelector(layout, kept, dropped, regrow_dropped=regrow_dropped)
    selector.add_rows(0, g_items.clone())
    new_flat, _ = apply_growth(layout, kept, dropped, selector.grown())
    ones = torch.ones(new_flat.numel(), layout.item[0], layout.item[1], dtype=torch.bool)
    return layout.to_dense(ones, new_flat).view(mask.shape)
