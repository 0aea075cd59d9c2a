"""Layer distributions: how one global sparsity is spread over layers.

``uniform`` gives every layer the same sparsity. ``erk`` follows the RigL reference
(google-research/rigl ``sparse_utils.get_sparsities_erdos_renyi``): a layer's raw density is
``sum(shape) / prod(shape)``; one scale ``eps`` is solved so that the kept count of the solved
layers matches the target; when the largest scaled density exceeds 1, every layer tied at that raw
density becomes dense at once (and its zeros are charged to the others' budget) and the scale is
solved again. Layers the user fixes (``dense=`` or an override) are left out of the solve and of
the budget, exactly as the reference treats its ``custom_sparsity_map``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from sparsec.errors import SparsecError


def n_zeros(n_params: int, sparsity: float) -> int:
    """Zeros of a layer of ``n_params`` at ``sparsity``: ``floor(s * n)`` (kept is ``n - floor(s * n)``)."""
    return int(math.floor(sparsity * n_params))


def uniform_densities(shapes: Sequence[Sequence[int]], sparsity: float, dense: Collection[int] = ()) -> list[float]:
    """Every layer at ``1 - sparsity``; layers whose index is in ``dense`` at 1."""
    _check(shapes, sparsity, dense)
    return [1.0 if i in dense else 1.0 - sparsity for i in range(len(shapes))]


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float, dense: Collection[int] = ()) -> list[float]:
    """Erdős–Rényi-Kernel densities of layers with weight ``shapes`` at global ``sparsity``.

    ``dense`` holds indices of layers fixed by the user: density 1, left out of the solve and of
    the parameter budget (the reference's custom layers).
    """
    _check(shapes, sparsity, dense)
    dense = set(dense)
    saturated: set[int] = set()
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for i, shape in enumerate(shapes):
            n = math.prod(shape)
            if i in saturated:
                rhs -= n_zeros(n, sparsity)
            elif i in dense:
                continue
            else:
                rhs += n - n_zeros(n, sparsity)
                raw[i] = sum(shape) / n
                divisor += raw[i] * n
        if not raw:  # every layer saturated or fixed
            break
        eps = rhs / divisor
        max_raw = max(raw.values())
        if max_raw * eps <= 1.0:
            break
        saturated.update(i for i, p in raw.items() if p == max_raw)
    return [1.0 if (i in dense or i in saturated) else eps * raw[i] for i in range(len(shapes))]


DISTRIBUTIONS = {"uniform": uniform_densities, "erk": erk_densities}


def _check(shapes, sparsity, dense) -> None:
    if not (0.0 <= sparsity < 1.0):
        raise SparsecError(f"global sparsity {sparsity!r} is outside [0, 1); write e.g. 0.9 for 90% zeros")
    for i, shape in enumerate(shapes):
        if len(shape) < 2 or any(int(d) < 1 for d in shape):
            raise SparsecError(f"layer {i} has weight shape {tuple(shape)}; a sparse layer needs >= 2 positive dims")
    bad = [i for i in dense if not 0 <= i < len(shapes)]
    if bad:
        raise SparsecError(f"dense layer indices {bad} are out of range for {len(shapes)} layers")
