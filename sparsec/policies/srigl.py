"""srigl: constant fan-in RigL with neuron ablation (policies.base.SRigL).

The update needs two passes over ``|dY^T X|`` (saliency decides the new fan-in, which decides how
much each row regrows), so the armed backward keeps ``dY`` and ``X`` (O(batch x (in + out))) and
the update scores chunks of output rows from them twice; no dense gradient is ever stored. A layer
keeps its fan-in storage until an output is ablated; from then on it is stored as compressed rows
(ablated rows empty: no kernel work), every active row holding exactly ``k`` weights.
"""

from __future__ import annotations

import torch

from sparsec import config
from sparsec.formats import make_layout
from sparsec.nn.layers import SparseLayer
from sparsec.policies.optim_state import replace_parameter
from sparsec.runtime.selection import GrowSelector, best_per_row
from sparsec.spec import FanIn, unstructured_with


class ActivationCapture:
    """Armed on a srigl layer for the update step's backward: keeps ``dY`` and ``X``."""

    def __init__(self, dropped: torch.Tensor):
        self.dropped = dropped
        self.dy: torch.Tensor | None = None
        self.x: torch.Tensor | None = None

    def observe(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        self.dy, self.x = dy.detach().clone(), x.detach().clone()


def _chunks(dy: torch.Tensor, x: torch.Tensor):
    """``|dY^T X|`` one chunk of output rows at a time."""
    rows = max(1, config.grow_chunk_bytes // (x.shape[1] * (x.element_size() + 20)))
    for r0 in range(0, dy.shape[1], rows):
        yield r0, (dy[:, r0 : r0 + rows].t() @ x).abs_()


def _layerwide_top(dy, x, active: torch.Tensor, d: int) -> torch.Tensor:
    """Flat positions of the ``d`` largest ``|dY^T X|`` over active rows (ties: lower flat index)."""
    inn = x.shape[1]
    flat = torch.empty(0, dtype=torch.int64, device=x.device)
    score = torch.empty(0, dtype=x.dtype, device=x.device)
    if d == 0:
        return flat
    for r0, g in _chunks(dy, x):
        g[~active[r0 : r0 + g.shape[0]]] = -torch.inf
        take = best_per_row(g.reshape(1, -1), torch.tensor([d], device=g.device)).view(-1)
        flat = torch.cat([flat, r0 * inn + take.nonzero().flatten()])  # ascending: chunks come in order
        score = torch.cat([score, g.reshape(-1)[take]])
        best = best_per_row(score.view(1, -1), torch.tensor([d], device=g.device)).view(-1)
        flat, score = flat[best], score[best]
    return flat


@torch.no_grad()
def srigl_update(updater, name: str, layer: SparseLayer, capture: ActivationCapture | None, last: bool) -> None:
    if capture is None or capture.dy is None:
        return updater._skip(name, "no backward ran through the layer since the updater armed it")
    dy, x = capture.dy, capture.x
    if not (bool(torch.isfinite(dy).all()) and bool(torch.isfinite(x).all())):
        return updater._skip(name, "a NaN or Inf gradient score")
    out, inn = layer.layout.out_features, layer.layout.in_features
    kept, dropped = layer.positions(), capture.dropped
    rows = kept // inn
    active = torch.bincount(rows, minlength=out) > 0
    budget = make_layout(layer.target_spec, out, inn).n_items
    k = budget // int(active.sum())
    survives = torch.ones(kept.numel(), dtype=torch.bool, device=kept.device)
    survives[dropped] = False
    surviving = torch.bincount(rows[survives], minlength=out)
    # saliency: surviving weights plus the layer's n_drop best gradients outside them
    top = _layerwide_top(dy, x, active, int(dropped.numel()))
    top = top[~torch.isin(top, kept[survives])]
    salient = surviving + torch.bincount(top // inn, minlength=out)
    ablate = active & (salient < max(1, int(layer.policy.gamma_sal * k)))
    if last:
        ablate[:] = False
    needed = -(-budget // inn)  # enough outputs to hold the budget at a fan-in of at most in_features
    short = needed - int((active & ~ablate).sum())
    if short > 0:  # keep the most salient of the candidates (ties: lower row)
        candidates = ablate.nonzero().flatten()
        order = salient[candidates].argsort(descending=True, stable=True)
        ablate[candidates[order[:short]]] = False
    alive = active & ~ablate
    k_new = budget // int(alive.sum())
    need = torch.where(alive, k_new - surviving, torch.zeros_like(surviving))
    gone = ~survives | ablate[rows]  # dropped, or in an ablated row
    rows_layout = make_layout(FanIn(k=1), out, inn)  # units are rows
    selector = GrowSelector(
        rows_layout, kept, gone.nonzero().flatten(), need=need, regrow_dropped=layer.policy.regrow_dropped
    )
    for r0, g in _chunks(dy, x):
        selector.add_rows(r0, g)
    new_flat = torch.cat([kept[~gone], selector.grown()]).sort().values
    counts = torch.bincount(new_flat // inn, minlength=out)
    assert bool(((counts == 0) | (counts == k_new)).all()) and int(counts.sum()) == int(alive.sum()) * k_new
    at = torch.searchsorted(kept, new_flat).clamp(max=kept.numel() - 1)
    src = torch.where(kept[at] == new_flat, at, -1)
    spec = FanIn(k=k_new) if bool(alive.all()) else unstructured_with(out * inn, new_flat.numel())
    old = layer.set_layout(spec, new_flat, src)
    replace_parameter(updater.optimizer, old, layer.values, src)
    updater.last_changes[name] = int((src < 0).sum())
    updater.last_dropped[name] = int(dropped.numel())
