"""The drop/grow decision, shared by every policy and by the dense ``rigl_step`` function.

Conventions (pinned by tests, stated in the README):

- drop: the ``floor(n_items * f)`` kept items of smallest drop score (|w|, or mean |w| over a
  block) across the layer; ties go to the lower flat index;
- grow: each unit (layer, N:M group, fan-in row) regrows exactly as many items as it lost, taking
  the largest grow scores among its positions not kept after the drop (just-dropped positions are
  eligible); ties go to the lower flat index;
- an item dropped and regrown in one update keeps its slot: its value and optimizer state;
- new items start at zero.

Grow candidates arrive as (flat index, score) pairs for positions not kept now, already reduced
to the best ``layout.grow_cap(n_drop)`` of each unit (see ``candidates``), plus the grow score of
every kept item; the union is exactly what the rule above can pick from.
"""

from __future__ import annotations

import math
import warnings

import torch

from sparsec.dsl.spec import Spec, parse_spec
from sparsec.errors import ShapeError, SparsecWarning
from sparsec.nn.formats import Layout, make_layout


def order_by_unit_score(unit: torch.Tensor, score: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by (unit ascending, score descending, flat index ascending)."""
    perm = flat.argsort(stable=True)
    perm = perm[score[perm].argsort(descending=True, stable=True)]
    return perm[unit[perm].argsort(stable=True)]


def top_per_unit(unit: torch.Tensor, score: torch.Tensor, flat: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Indices of the ``take[u]`` best entries (score desc, flat asc) of every unit ``u``."""
    perm = order_by_unit_score(unit, score, flat)
    u = unit[perm]
    first = torch.searchsorted(u, u, right=False)
    rank = torch.arange(u.numel(), device=u.device) - first
    return perm[rank < take[u]]


def select_update(
    layout: Layout,
    kept: torch.Tensor,
    drop_score: torch.Tensor,
    kept_grow_score: torch.Tensor,
    cand_flat: torch.Tensor,
    cand_score: torch.Tensor,
    n_drop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New sorted kept positions and, for each, its old slot (``-1`` for a grown item)."""
    n = kept.numel()
    slots = torch.arange(n, device=kept.device)
    dropped = drop_score.argsort(stable=True)[:n_drop]  # kept is sorted: ties keep the lower flat index
    lost = torch.bincount(kept[dropped] // layout.unit_size, minlength=layout.n_units)

    elig_flat = torch.cat([cand_flat, kept[dropped]])
    elig_score = torch.cat([cand_score.to(kept_grow_score.dtype), kept_grow_score[dropped]])
    elig_slot = torch.cat([torch.full_like(cand_flat, -1), slots[dropped]])
    chosen = top_per_unit(elig_flat // layout.unit_size, elig_score, elig_flat, lost)

    survives = torch.ones(n, dtype=torch.bool, device=kept.device)
    survives[dropped] = False
    new_flat = torch.cat([kept[survives], elig_flat[chosen]])
    src = torch.cat([slots[survives], elig_slot[chosen]])
    order = new_flat.argsort()
    new_flat, src = new_flat[order], src[order]
    layout.check_positions(new_flat, what="updated mask")  # exact counts per unit, checked every time
    return new_flat, src


def n_drop_for(layout: Layout, drop_fraction: float) -> int:
    return int(math.floor(layout.n_items * drop_fraction))


def item_scores(layout: Layout, dense_scores: torch.Tensor) -> torch.Tensor:
    """Per-item scores on the item grid: the scores themselves, or their block means."""
    if layout.item == (1, 1):
        return dense_scores
    bh, bw = layout.item
    return dense_scores.reshape(-1, bh, layout.grid[1], bw).mean(dim=(1, 3))


def drop_scores(layout: Layout, values: torch.Tensor) -> torch.Tensor:
    """Drop score of every kept item in stored order: |w|, or mean |w| over a block."""
    magnitude = values.detach().abs().reshape(layout.n_items, -1)
    return magnitude[:, 0] if magnitude.shape[1] == 1 else magnitude.mean(dim=1)


def rigl_step(
    mask: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, drop_fraction: float, spec: str | Spec
) -> torch.Tensor:
    """One RigL mask update on dense tensors (the reference semantics, for tests and parity).

    ``mask``, ``weight`` and ``grad`` share the dense weight shape (conv weights are seen as
    ``[out, in*kh*kw]``). Returns the new boolean mask; a NaN or Inf score returns ``mask``
    unchanged with a warning.
    """
    from sparsec.policies.candidates import CandidateCollector

    if not (mask.shape == weight.shape == grad.shape):
        raise ShapeError(f"mask {tuple(mask.shape)}, weight {tuple(weight.shape)} and grad {tuple(grad.shape)} differ")
    out = mask.shape[0]
    layout = make_layout(parse_spec(spec), out, mask.numel() // out, "rigl_step")
    kept = layout.item_positions_from_mask(mask)
    w_items = item_scores(layout, weight.reshape(layout.out_features, -1).abs())
    g_items = item_scores(layout, grad.reshape(layout.out_features, -1).abs())
    if not (torch.isfinite(w_items).all() and torch.isfinite(g_items).all()):
        warnings.warn(
            "rigl_step: NaN or Inf in the weight or gradient; the mask is unchanged",
            SparsecWarning,
            stacklevel=2,
        )
        return mask.clone()
    n_drop = n_drop_for(layout, drop_fraction)
    collector = CandidateCollector(layout, kept, layout.grow_cap(n_drop), dtype=g_items.dtype)
    collector.add_rows(0, g_items)
    drop_score = w_items.reshape(-1)[kept]
    new_flat, _ = select_update(layout, kept, drop_score, collector.kept_scores, *collector.candidates(), n_drop)
    ones = torch.ones(new_flat.numel(), layout.item[0], layout.item[1], dtype=torch.bool)
    return layout.to_dense(ones, new_flat).view(mask.shape)
