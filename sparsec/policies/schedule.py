"""When masks change and by how much: the RigL cosine schedule.

Steps count optimizer steps from 1. An update happens after optimizer step ``t`` when
``t % delta_t == 0`` and ``t < T_end`` with ``T_end = t_end * total_steps``; it drops the
fraction ``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))`` of each layer's kept weights.
"""

from __future__ import annotations

import math


def is_update_step(t: int, delta_t: int, t_end: float, total_steps: int) -> bool:
    return t >= 1 and t % delta_t == 0 and t < t_end * total_steps


def cosine_drop_fraction(t: int, alpha: float, t_end: float, total_steps: int) -> float:
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / (t_end * total_steps)))
