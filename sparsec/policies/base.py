"""Mask policies as frozen values: ``rigl``, ``rigl(delta_t=50)``, ``"set(alpha=0.5)"``.

A policy answers two questions for the ``MaskUpdater``: is step ``t`` an update step, and what
fraction of kept weights is dropped there. How candidates are scored (gradient, random) is the
policy's ``grow`` field; the drop/grow decision itself lives in ``policies.decision``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from sparsec.errors import SpecError
from sparsec.policies.schedule import cosine_drop_fraction, is_update_step
from sparsec.spec.policy import Policy, check_fraction, check_regrow, check_schedule
from sparsec.spec.specs import FanIn, Unstructured


@dataclass(frozen=True)
class Static(Policy):
    """The mask chosen at initialisation never changes."""

    name: ClassVar[str] = "static"


@dataclass(frozen=True)
class _Scheduled(Policy):
    """Drop by magnitude at ``delta_t`` intervals with the cosine-decayed fraction ``alpha``.

    Regrowth takes fresh positions (not kept before the update), so every update that drops weights
    changes the mask; ``regrow_dropped=True`` lets just-dropped weights compete for regrowth, keeping
    value and optimizer state (google-research/rigl's behaviour: late updates can then change nothing).
    """

    delta_t: int = 100
    alpha: float = 0.3
    t_end: float = 0.75
    regrow_dropped: bool = False

    def __post_init__(self) -> None:
        check_schedule(self)
        check_fraction(self, "alpha", "initial drop fraction")
        check_regrow(self)

    def is_update_step(self, t: int, total_steps: int) -> bool:
        return is_update_step(t, self.delta_t, self.t_end, total_steps)

    def drop_fraction(self, t: int, total_steps: int) -> float:
        return cosine_drop_fraction(t, self.alpha, self.t_end, total_steps)


@dataclass(frozen=True)
class SET(_Scheduled):
    """Sparse Evolutionary Training: drop by magnitude, grow uniformly at random (seeded)."""

    name: ClassVar[str] = "set"
    grow: ClassVar[str | None] = "random"


@dataclass(frozen=True)
class RigL(_Scheduled):
    """Rigged Lottery: drop by magnitude, grow where |dense gradient| is largest."""

    name: ClassVar[str] = "rigl"
    grow: ClassVar[str | None] = "gradient"


@dataclass(frozen=True)
class SRigL(_Scheduled):
    """Structured RigL (Lasby et al. 2023): RigL that keeps constant fan-in, with neuron ablation.

    Every active output keeps exactly ``k = floor(K / active outputs)`` inputs, ``K`` the layer's
    budget. At an update the drop is RigL's (layer-wide smallest |w|); an output whose salient
    weights (those surviving the drop, plus those among the layer's ``n_drop`` largest |gradient|)
    number fewer than ``max(1, int(gamma_sal * k))`` is ablated, unless too few outputs would be
    left to hold the budget (then the most salient of them stay) or the layer is the model's last
    sparse layer. Survivors then regrow to the new ``k`` by largest |gradient| in their row.
    Ablated outputs hold no weights: the kernels do no work for them.
    """

    name: ClassVar[str] = "srigl"
    grow: ClassVar[str | None] = "srigl"
    gamma_sal: float = 0.3

    def initial_spec(self, target):
        if not isinstance(target, FanIn):
            raise SpecError(
                f"srigl keeps a constant fan-in per output, so it needs a fan-in spec such as fanin(90%) or "
                f"fanin(k=64); got {target}"
            )
        return target  # after the first ablation the layer is stored as compressed rows (sparsec.train.srigl)


@dataclass(frozen=True)
class SNFS(Policy):
    """Sparse momentum (Dettmers & Zettlemoyer 2019).

    At ``delta_t`` intervals until ``t_end``: every snfs layer drops the ``floor(n * p_t)`` kept weights
    of smallest ``|w|`` (``p_t = prune_rate / 2 * (1 + cos(pi * t / T_end))``); the total dropped is
    redistributed across layers in proportion to each layer's mean momentum magnitude over its kept
    weights (largest remainder), and every layer grows its share at the positions of largest momentum
    magnitude (ties: lower flat index). Shares and growth go to fresh positions, those not kept before
    the update; just-dropped positions only take what no layer has fresh room for (or compete with fresh
    ones when ``regrow_dropped=True``), so every update that drops weights changes the masks.
    Momentum is SGD's buffer, or Adam's ``m / (sqrt(v) + 1e-8)``. Growing by momentum needs the
    momentum of weights that do not exist yet, so snfs keeps a dense momentum shadow and computes the
    dense gradient at every step: the one policy that holds O(out x in) memory.
    """

    name: ClassVar[str] = "snfs"
    grow: ClassVar[str | None] = "momentum"
    delta_t: int = 100
    prune_rate: float = 0.5
    t_end: float = 0.75
    regrow_dropped: bool = False

    def __post_init__(self) -> None:
        check_schedule(self)
        check_fraction(self, "prune_rate", "initial prune rate")
        check_regrow(self)

    def initial_spec(self, target):
        if not isinstance(target, Unstructured):
            raise SpecError(
                f"snfs moves weights between layers, so layer densities change: it needs unstructured specs "
                f"such as 90%; got {target}"
            )
        return target

    def is_update_step(self, t: int, total_steps: int) -> bool:
        return is_update_step(t, self.delta_t, self.t_end, total_steps)

    def drop_fraction(self, t: int, total_steps: int) -> float:
        return cosine_drop_fraction(t, self.prune_rate, self.t_end, total_steps)


@dataclass(frozen=True)
class GMP(Policy):
    """Gradual magnitude pruning (Zhu & Gupta 2017): from ``s_0`` to the layer's target sparsity ``s_f``.

    At ``t = t0 + k * delta_t`` for ``t0 = t_start * total`` up to ``t1 = t_end * total`` the layer is
    pruned by magnitude to ``s_t = s_f + (s_0 - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` (the cubic
    schedule with ``n * delta_t = t1 - t0``); storage shrinks with it. Nothing ever grows back.
    """

    name: ClassVar[str] = "gmp"
    delta_t: int = 100
    s_0: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.75

    def __post_init__(self) -> None:
        check_schedule(self)
        if not (isinstance(self.s_0, (int, float)) and 0.0 <= self.s_0 < 1.0):
            raise SpecError(f"gmp: s_0={self.s_0!r} must be in [0, 1) (the sparsity training starts from)")
        if not (0.0 <= self.t_start < self.t_end <= 1.0):
            raise SpecError(
                f"gmp: need 0 <= t_start < t_end <= 1 (fractions of total_steps), got {self.t_start}, {self.t_end}"
            )

    def initial_spec(self, target):
        if not target.has_free_sparsity:
            raise SpecError(
                f"gmp prunes toward a sparsity, but spec {target} fixes the density; use a spec with a sparsity "
                f"such as 90%, block(16x16, 90%) or fanin(90%)"
            )
        return dataclasses.replace(target, sparsity=min(self.s_0, target.sparsity))

    def window(self, total_steps: int) -> tuple[float, float]:
        return self.t_start * total_steps, self.t_end * total_steps

    def is_update_step(self, t: int, total_steps: int) -> bool:
        """Every ``delta_t`` steps from ``t0``, and once more at the first step >= ``t1`` (the final sparsity)."""
        t0, t1 = self.window(total_steps)
        return t >= 1 and ((t0 <= t <= t1 and (t - math.ceil(t0)) % self.delta_t == 0) or t == math.ceil(t1))

    def sparsity_at(self, t: int, total_steps: int, final: float) -> float:
        """The cubic schedule: ``s_0`` at ``t0``, ``final`` from ``t1`` on."""
        t0, t1 = self.window(total_steps)
        progress = min(1.0, max(0.0, (t - t0) / (t1 - t0)))
        return final + (min(self.s_0, final) - final) * (1.0 - progress) ** 3


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


@dataclass(frozen=True)
class SmallDense(Policy):
    """The baseline of the RigL paper: a dense model with as many weights as the sparse one would keep.

    ``sparsify(model, spec, policy=small_dense)`` shrinks the hidden widths of an ``nn.Sequential``
    chain of Linear/Conv2d layers (the input and output widths stay) by one factor, the largest whose
    dense weights fit the sparse model's kept-weight budget, and re-initialises the layers.
    """

    name: ClassVar[str] = "small_dense"


static = Static()
set_ = SET()
rigl = RigL()
gmp = GMP()
srigl = SRigL()
snfs = SNFS()
snip = SNIP()
small_dense = SmallDense()
