"""srigl: Structured RigL (Lasby et al. 2023), constant fan-in RigL with neuron ablation.

The update needs two passes over ``|dY^T X|`` (saliency decides the new fan-in, which decides how
much each row regrows), so the armed backward keeps ``dY`` and ``X`` (O(batch x (in + out))) and
the update scores chunks of output rows from them twice; no dense gradient is ever stored. A layer
keeps its fan-in storage until an output is ablated; from then on it is stored as compressed rows
(ablated rows empty: no kernel work), every active row holding exactly ``k`` weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsec.errors import SpecError
from sparsec.formats import Layout, make_layout
from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import Capture, Change, Context, StepActivations
from sparsec.policies.decision import remap_positions, survivor_mask
from sparsec.policies.schedule import Scheduled
from sparsec.runtime.selection import GrowSelector, best_per_row, grad_row_chunks
from sparsec.spec import FanIn, unstructured_with


class ActivationCapture(StepActivations):
    """Armed on a srigl layer for the update step: keeps the ``dY`` and ``X`` of its backwards."""

    def __init__(self, kept: torch.Tensor, dropped: torch.Tensor):
        super().__init__()
        self.kept, self.dropped = kept, dropped


@dataclass(frozen=True)
class SRigL(Scheduled):
    """Structured RigL (Lasby et al. 2023): RigL that keeps constant fan-in, with neuron ablation.

    As calgaryml/condensed-sparsity (``RigLConstFanScheduler``): the layer's budget is
    ``K = int(out * in * (1 - s))`` (``fanin(k=...)``: ``k * out``) and every active output keeps exactly
    ``k = floor(K / active outputs)`` inputs. At an update the drop is RigL's (layer-wide smallest |w|);
    the salient weights of an output are those surviving the drop plus those among the layer's
    ``n_drop`` largest |gradient| (every output, ablated ones included, so an ablated output can come
    back). An output with fewer than the threshold is ablated: ``max(1, int(gamma_sal * k0))`` with
    ``k0 = floor(K / out)``, the fan-in before any ablation; ``gamma_sal >= 1`` is an absolute count and
    ``gamma_sal = 0`` turns ablation off. Never the model's last sparse layer, and never so many that
    the rest cannot hold the budget (then the most salient stay). Active outputs then regrow to the new
    ``k`` by largest |gradient| in their row (just-dropped positions compete by default). Ablated
    outputs hold no weights: the kernels do no work for them.
    """

    name: ClassVar[str] = "srigl"
    default_init: ClassVar[str] = "sparse"  # condensed-sparsity re-initialises each row for its sparse fan-in
    gamma_sal: float = 0.3

    @property
    def changes_density(self) -> bool:  # an ablation moves the layer to compressed rows of another count
        return self.gamma_sal > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.gamma_sal, (int, float)) and math.isfinite(self.gamma_sal) and self.gamma_sal >= 0):
            raise SpecError(
                f"srigl: gamma_sal={self.gamma_sal!r} must be a number >= 0 (a fraction of the fan-in below 1, "
                "an absolute count of salient weights from 1, 0 for no ablation)"
            )

    def initial_spec(self, target, shape: tuple[int, int]):
        if not isinstance(target, FanIn):
            raise SpecError(
                f"srigl keeps a constant fan-in per output, so it needs a fan-in spec such as fanin(90%) or "
                f"fanin(k=64); got {target}"
            )
        k = fan_in_budget(target, *shape) // shape[0]
        if k == 0:
            raise SpecError(f"srigl: {target} on a {shape[0]}x{shape[1]} weight keeps no input per output; lower it")
        return FanIn(k=k)  # after the first ablation the layer is stored as compressed rows (module docstring)

    def threshold(self, k0: int) -> int:
        """Salient weights an output needs to stay active (0: ablation off)."""
        if self.gamma_sal == 0:
            return 0
        return int(self.gamma_sal) if self.gamma_sal >= 1 else max(1, int(self.gamma_sal * k0))

    def capture(self, layer: SparseLayer, kept: torch.Tensor, dropped: torch.Tensor) -> Capture:
        return ActivationCapture(kept, dropped)

    @classmethod
    def update(
        cls, due: Mapping[str, SparseLayer], captures: Mapping[str, Capture | None], ctx: Context
    ) -> dict[str, Change | str]:
        return {name: _update(layer, captures[name], last=name == ctx.last_layer) for name, layer in due.items()}


srigl = SRigL()


def fan_in_budget(target: FanIn, out: int, inn: int) -> int:
    """Weights a srigl layer keeps: ``k * out``, or ``int(out * in * (1 - s))`` (the reference's count)."""
    return target.k * out if target.k is not None else int(out * inn * (1.0 - target.sparsity))


def _layerwide_top(layout: Layout, dy, x, d: int) -> torch.Tensor:
    """Flat positions of the ``d`` largest ``|dY^T X|`` over the layer (ties: lower flat index)."""
    inn = x.shape[1]
    flat = torch.empty(0, dtype=torch.int64, device=x.device)
    score = torch.empty(0, dtype=x.dtype, device=x.device)
    if d == 0:
        return flat
    for r0, g in grad_row_chunks(layout, dy, x):
        g.abs_()
        take = best_per_row(g.reshape(1, -1), torch.tensor([d], device=g.device)).view(-1)
        flat = torch.cat([flat, r0 * inn + take.nonzero().flatten()])  # ascending: chunks come in order
        score = torch.cat([score, g.reshape(-1)[take]])
        best = best_per_row(score.view(1, -1), torch.tensor([d], device=g.device)).view(-1)
        flat, score = flat[best], score[best]
        del g, take  # before the next chunk is computed
    return flat


@torch.no_grad()
def _update(layer: SparseLayer, capture: ActivationCapture | None, last: bool) -> Change | str:
    pair = None if capture is None else capture.activations()
    if pair is None:
        return "no backward ran through the layer since the updater armed it"
    dy, x = pair
    if not (bool(torch.isfinite(dy).all()) and bool(torch.isfinite(x).all())):
        return "a NaN or Inf gradient score"
    layout = layer.layout
    out, inn = layout.out_features, layout.in_features
    kept, dropped = capture.kept.long(), capture.dropped  # int64: the ablation's arithmetic mixes it with int64
    rows = kept // inn
    budget = fan_in_budget(layer.target_spec, out, inn)
    survives = survivor_mask(kept, dropped)
    surviving = torch.bincount(rows[survives], minlength=out)
    # saliency: surviving weights plus the layer's n_drop best gradients outside them, over every output
    top = _layerwide_top(layout, dy, x, int(dropped.numel()))
    top = top[~torch.isin(top, kept[survives])]
    salient = surviving + torch.bincount(top // inn, minlength=out)
    ablate = salient < layer.policy.threshold(budget // out)  # recomputed each update: outputs can come back
    if last:
        ablate[:] = False
    needed = -(-budget // inn)  # enough outputs to hold the budget at a fan-in of at most in_features
    short = needed - int((~ablate).sum())
    if short > 0:  # keep the most salient of the candidates (ties: lower row)
        candidates = ablate.nonzero().flatten()
        order = salient[candidates].argsort(descending=True, stable=True)
        ablate[candidates[order[:short]]] = False
    alive = ~ablate
    k_new = budget // int(alive.sum())
    need = torch.where(alive, k_new - surviving, torch.zeros_like(surviving))
    stays = survives & ~ablate[rows]  # neither dropped nor in an ablated row
    rows_layout = make_layout(FanIn(k=1), out, inn)  # units are rows
    selector = GrowSelector(
        rows_layout, kept, (~stays).nonzero().flatten(), need=need, regrow_dropped=layer.policy.regrow_dropped
    )
    for r0, g in grad_row_chunks(layout, dy, x):
        selector.add_rows(r0, g.abs_())
        del g  # before the next chunk is computed
    new_flat, src = remap_positions(kept, stays, selector.grown())
    counts = torch.bincount(new_flat // inn, minlength=out)
    assert bool(((counts == 0) | (counts == k_new)).all()) and int(counts.sum()) == int(alive.sum()) * k_new
    spec = FanIn(k=k_new) if bool(alive.all()) else unstructured_with(out * inn, new_flat.numel())
    return Change(new_flat, src, dropped=int(dropped.numel()), spec=spec)
