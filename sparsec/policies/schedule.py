"""When masks change and by how much: the RigL cosine schedule, and the policies that follow it.

Steps count optimizer steps from 1. An update happens after optimizer step ``t`` when
``t % delta_t == 0`` and ``t < T_end`` with ``T_end = t_end * total_steps``; it drops the
fraction ``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))`` of each layer's kept weights.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import Capture, Context, Policy
from sparsec.policies.decision import choose_drops, drop_scores, n_drop_for
from sparsec.runtime.selection import all_finite
from sparsec.spec.policy import check_fraction, check_regrow, check_schedule


def is_update_step(t: int, delta_t: int, t_end: float, total_steps: int) -> bool:
    return t >= 1 and t % delta_t == 0 and t < t_end * total_steps


def cosine_drop_fraction(t: int, alpha: float, t_end: float, total_steps: int) -> float:
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / (t_end * total_steps)))


@dataclass(frozen=True)
class Scheduled(Policy, abc.ABC):
    """Drop by magnitude at ``delta_t`` intervals with the cosine-decayed fraction ``alpha`` (set, rigl, srigl).

    The drop is decided when the layer is armed, one step ahead, from the weights the update step's
    forward uses (RigL's Algorithm 1); ``capture`` says what the policy then arms for its growth.
    By default just-dropped weights compete for regrowth with positions not kept before the update, and
    one regrown keeps its value and optimizer state (``regrow_dropped=True``: RigL's Algorithm 1 and
    google-research/rigl, SET's and SRigL's reference code; a late update can then change nothing).
    ``regrow_dropped=False`` takes fresh positions first, so every update that drops weights changes
    the mask.
    """

    delta_t: int = 100
    alpha: float = 0.3
    t_end: float = 0.75
    regrow_dropped: bool = True

    def __post_init__(self) -> None:
        check_schedule(self)
        check_fraction(self, "alpha", "initial drop fraction")
        check_regrow(self)

    def is_update_step(self, t: int, total_steps: int) -> bool:
        return is_update_step(t, self.delta_t, self.t_end, total_steps)

    def drop_fraction(self, t: int, total_steps: int) -> float:
        return cosine_drop_fraction(t, self.alpha, self.t_end, total_steps)

    def arm(self, layer: SparseLayer, ctx: Context, state) -> Capture | str | None:
        if not self.is_update_step(ctx.t, ctx.total_steps):
            return None
        scores = drop_scores(layer.layout, layer.whole_values())
        if not all_finite(scores):
            return "a NaN or Inf weight"
        dropped = choose_drops(scores, n_drop_for(layer.layout, self.drop_fraction(ctx.t, ctx.total_steps)))
        return self.capture(layer, layer.update_positions(), dropped)

    @abc.abstractmethod
    def capture(self, layer: SparseLayer, kept: torch.Tensor, dropped: torch.Tensor) -> Capture:
        """What to arm once the drop (``dropped`` slots of ``kept``) is decided; ``kept`` is int32 where the
        layer's ``update_positions`` narrows them."""
