"""snip: SNIP (Lee et al. 2019), the mask chosen once by connection sensitivity ``|g * w|``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.formats import Layout, item_scores
from sparsec.policies.base import Policy, Replace
from sparsec.runtime.selection import rank_in_unit
from sparsec.spec import Spec


@dataclass(frozen=True)
class SNIP(Policy):
    """SNIP (Lee et al. 2019): the mask is chosen once, at initialisation, by connection sensitivity
    ``|g * w|`` of the dense model on one batch, per layer; it never changes afterwards.

    ``loss`` is a callable ``loss(model) -> scalar`` evaluated on the dense model by ``sparsify``.
    """

    name: ClassVar[str] = "snip"
    loss: Callable | None = dataclasses.field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.name

    def prepare(
        self, model: nn.Module, targets: Mapping[str, nn.Module], specs: Mapping[str, Spec], replace: Replace
    ) -> nn.Module:
        """Every layer keeps the best ``|g * w|`` of each unit (ties: lower index) instead of a random topology."""
        if self.loss is None:
            raise SparsecError(
                "snip chooses the mask from one batch: pass policy=sparsec.snip(loss=lambda model: ...), a callable "
                "returning the loss of the dense model on that batch"
            )
        on_meta = [name for name, m in targets.items() if m.weight.is_meta]
        if on_meta:
            raise SparsecError(
                f"snip scores the dense model's gradient on a batch, and {on_meta[0]} is on the meta device (no "
                f"values): build the model on a real device for snip, or use another policy (rigl, set, static "
                f"draw a random topology, which reset_parameters() draws after to_empty)"
            )
        sensitivity = _snip_scores(model, targets, self.loss)

        def initial(name: str, layout: Layout) -> torch.Tensor:
            return top_items(layout, item_scores(layout, sensitivity[name].reshape(layout.out_features, -1)))

        return replace(initial)


snip = SNIP()


def _snip_scores(model: nn.Module, targets: Mapping[str, nn.Module], loss) -> dict[str, torch.Tensor]:
    """``|g * w|`` of every target layer's dense weight for one evaluation of ``loss(model)``."""
    weights = [m.weight for m in targets.values()]
    grads = torch.autograd.grad(loss(model), weights, allow_unused=True)
    scores = {}
    for (name, module), g in zip(targets.items(), grads, strict=True):
        if g is None:
            raise SparsecError(f"snip: the loss does not depend on layer {name!r}; check the loss callable")
        scores[name] = (g * module.weight).detach().abs()
    return scores


def top_items(layout: Layout, scores: torch.Tensor) -> torch.Tensor:
    """Sorted flat positions of every unit's ``kept_per_unit`` largest item scores (ties: lower index)."""
    flat = torch.arange(scores.numel(), device=scores.device)
    perm, rank = rank_in_unit(flat // layout.unit_size, scores.reshape(-1), flat)
    return perm[rank < layout.kept_per_unit].sort().values
