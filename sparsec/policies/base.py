"""Mask policies as frozen values: ``rigl``, ``rigl(delta_t=50)``, ``"set(alpha=0.5)"``.

A policy answers two questions for the ``MaskUpdater``: is step ``t`` an update step, and what
fraction of kept weights is dropped there. How candidates are scored (gradient, random) is the
policy's ``grow`` field; the drop/grow decision itself lives in ``policies.decision``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from sparsec.errors import SpecError
from sparsec.policies.schedule import cosine_drop_fraction, is_update_step


@dataclass(frozen=True)
class Policy:
    """Base of every policy value; calling one returns a copy with new parameters."""

    name: ClassVar[str] = "policy"
    grow: ClassVar[str | None] = None  # "gradient" | "random" | None (never grows)

    def __call__(self, **params) -> Policy:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise SpecError(
                f"policy {self.name!r} has no parameter {unknown[0]!r}; its parameters are {sorted(known) or 'none'}"
            )
        return dataclasses.replace(self, **params)

    def is_update_step(self, t: int, total_steps: int) -> bool:
        return False

    def drop_fraction(self, t: int, total_steps: int) -> float:
        return 0.0

    def __str__(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.name}({params})" if params else self.name


@dataclass(frozen=True)
class Static(Policy):
    """The mask chosen at initialisation never changes."""

    name: ClassVar[str] = "static"


@dataclass(frozen=True)
class _Scheduled(Policy):
    """Drop by magnitude at ``delta_t`` intervals with the cosine-decayed fraction ``alpha``."""

    delta_t: int = 100
    alpha: float = 0.3
    t_end: float = 0.75

    def __post_init__(self) -> None:
        if not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise SpecError(
                f"{self.name}: delta_t={self.delta_t!r} must be an integer of at least 1 (steps between updates)"
            )
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise SpecError(f"{self.name}: alpha={self.alpha!r} must be in [0, 1] (initial drop fraction)")
        if not (isinstance(self.t_end, (int, float)) and 0.0 < self.t_end <= 1.0):
            raise SpecError(f"{self.name}: t_end={self.t_end!r} must be in (0, 1] (fraction of total_steps)")

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


static = Static()
set_ = SET()
rigl = RigL()

POLICIES: dict[str, Policy] = {p.name: p for p in (static, set_, rigl)}
