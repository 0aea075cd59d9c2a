"""The drop/grow decision, shared by every policy and by the dense ``rigl_step`` function.

Conventions (pinned by tests, stated in the README):

- drop: the ``floor(n_items * f)`` kept items of smallest drop score (|w|, or mean |w| over a
  block) across the layer; ties go to the lower flat index. ``w`` is the weight the update
  step's forward and backward used, as in Algorithm 1 of the RigL paper;
- grow: each unit (layer, N:M group, fan-in row) regrows exactly as many items as it lost, taking
  the largest grow scores among the positions not kept after the drop: just-dropped items compete
  with fresh ones (``regrow_dropped=True``, the default: RigL's Algorithm 1 and google-research/rigl).
  With ``regrow_dropped=False`` it takes fresh positions (not kept before the update) first, so every
  update that drops something changes the mask, and a unit with fewer fresh positions than it lost
  regrows its best just-dropped items for the rest. Ties go to the lower flat index;
- an item dropped and regrown in one update keeps its slot: its value and optimizer state;
- new items start at zero.

Because the drop is known before the backward of the update step, the grow side only ever keeps
``lost[u]`` candidates per unit while it scans the gradient (``runtime.selection.GrowSelector``).
"""

from __future__ import annotations

import math
import warnings

import torch

from sparsec.errors import ShapeError, SparsecWarning
from sparsec.formats import Layout, item_scores, make_layout
from sparsec.policies.base import Change
from sparsec.runtime.cpp import cpp_merge_kept
from sparsec.runtime.ops import backend_for
from sparsec.runtime.selection import GrowSelector, best_in_row
from sparsec.spec import Spec, parse_spec


def n_drop_for(layout: Layout, drop_fraction: float) -> int:
    return int(math.floor(layout.n_items * drop_fraction))


def drop_scores(layout: Layout, values: torch.Tensor) -> torch.Tensor:
    """Drop score of every kept item in stored order: |w|, or mean |w| over a block."""
    magnitude = values.detach().abs().reshape(layout.n_items, -1)
    return magnitude[:, 0] if magnitude.shape[1] == 1 else magnitude.mean(dim=1)


def choose_drops(drop_score: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Slots of the ``n_drop`` smallest scores, ascending; slots follow flat order, so ties keep the lower.

    A selection, not a sort: the largest of the negated scores (``selection.best_in_row``: on the cpp backend
    the generated radix select; linear work), ties to the lower slot; the scores are negated in place for it
    and back after (exactly: no copy of a layer's scores). Scores it cannot rank (NaN, inf) go to the stable
    sort, which ranks NaN last."""
    if 0 < n_drop < drop_score.numel():
        try:
            picked = best_in_row(drop_score.neg_(), n_drop)
        finally:
            drop_score.neg_()
        if picked.numel() == n_drop:
            return picked
    return drop_score.argsort(stable=True)[:n_drop].sort().values


def survivor_mask(kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Boolean mask over the slots of ``kept``: False at the ``dropped`` slots."""
    survives = torch.ones(kept.numel(), dtype=torch.bool, device=kept.device)
    survives[dropped] = False
    return survives


def remap_positions(
    kept: torch.Tensor, survives: torch.Tensor, grown: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New sorted kept positions (the ``survives`` slots of ``kept``, and ``grown``) and, for each, its
    old slot in ``kept`` (``-1`` for a newly grown item).

    ``grown`` may hold just-dropped positions: those keep their slot, so their value and optimizer state.
    On the cpp backend the generated merge does it in one pass (``runtime.cpp.cpp_merge_kept``).
    """
    if not kept.is_cuda and backend_for(kept) == "cpp":
        return cpp_merge_kept(kept, survives, grown)
    new_flat = torch.cat([kept[survives], grown]).sort().values
    at = torch.searchsorted(kept, new_flat).clamp(max=kept.numel() - 1)
    src = torch.where(kept[at] == new_flat, at, -1)  # a position present before keeps its old slot
    return new_flat, src


def growth_change(kept: torch.Tensor, dropped: torch.Tensor, selector: GrowSelector) -> Change | str:
    """The change of a same-layout drop/grow update (rigl, set): drop the ``dropped`` slots of ``kept``,
    grow what a completed ``selector`` chose; or why the update is skipped."""
    if not selector.finite:
        return "a NaN or Inf gradient score"
    flat, src = remap_positions(kept, survivor_mask(kept, dropped), selector.grown())
    return Change(flat, src, dropped=int(dropped.numel()))


def rigl_step(
    mask: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    drop_fraction: float,
    spec: str | Spec,
    *,
    regrow_dropped: bool = True,
) -> torch.Tensor:
    """One RigL mask update on dense tensors (the reference semantics, for tests and parity).

    ``mask``, ``weight`` and ``grad`` share the dense weight shape (conv weights are seen as
    ``[out, in*kh*kw]``); ``weight`` is the weight that produced ``grad``. Returns the new boolean
    mask; a NaN or Inf score returns ``mask`` unchanged with a warning. ``regrow_dropped`` as for the
    ``rigl`` policy (``True``, the default: google-research/rigl's choice).
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
    new_flat, _ = remap_positions(kept, survivor_mask(kept, dropped), selector.grown())
    layout.check_positions(new_flat, what="updated mask")
    ones = torch.ones(new_flat.numel(), layout.item[0], layout.item[1], dtype=torch.bool)
    return layout.to_dense(ones, new_flat).view(mask.shape)
