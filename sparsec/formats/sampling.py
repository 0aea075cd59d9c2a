"""Uniformly random kept positions in O(kept) time and memory: a layer's initial topology without a dense tensor.

``random_subsets(units, size, k)`` picks ``k`` of the ``size`` positions of each of ``units`` contiguous
units, every ``k``-subset of a unit equally likely and units independent, without permuting (or scoring)
all ``units * size`` positions: positions are drawn with replacement, de-duplicated, topped up where a
unit is short, and thinned to exactly ``k`` by random priorities. The set of distinct draws of a unit is,
given its size, a uniform subset (the draws are exchangeable), and a uniform ``k``-subset of it is a
uniform ``k``-subset of the unit. Draws per unit: about ``size * ln(size / (size - k))``, at most
``1.39 k`` for ``k <= size / 2``; above half a unit the complement is drawn instead. Units with few
subsets (N:M groups: 6 for 2:4) draw one row of the table of all ``k``-subsets instead. Many units are
drawn a chunk at a time, and one large unit a piece at a time (``_PIECE``), so the transient memory stays a
few chunk- or piece-sized tensors.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

_CHUNK = 1 << 18  # kept positions of the units drawn together: the transient tensors are a few of this size
_PIECE = 1 << 16  # kept positions of one large unit drawn together: its transient tensors are a few of this size
_TABLE = 4096  # units with at most this many k-subsets draw a row of their table


def random_subsets(units: int, size: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted flat positions ``unit * size + local``: ``k`` distinct uniformly random locals per unit."""
    if not 0 <= k <= size:
        raise ValueError(f"cannot keep {k} of {size} positions per unit")
    if k == 0 or units == 0:
        return torch.empty(0, dtype=torch.int64)
    if units > 1 and units * k > _CHUNK:  # units a chunk at a time, into their places (ascending: sorted)
        step, out = max(1, _CHUNK // k), torch.empty(units * k, dtype=torch.int64)
        for u in range(0, units, step):
            n = min(step, units - u)
            torch.add(random_subsets(n, size, k, generator), u * size, out=out[u * k : (u + n) * k])
        return out
    if 2 * k > size:  # draw the positions left out, and keep the rest
        left = random_subsets(units, size, size - k, generator)
        keep = torch.ones(units * size, dtype=torch.bool)
        keep[left] = False
        return keep.nonzero().view(-1)
    if units == 1 and k > _PIECE:
        return _one_large_unit(size, k, generator)
    if _subsets_at_most(size, k, _TABLE):  # one of the unit's k-subsets, by its row in the table of them all
        # (itertools lists the subsets themselves; torch.combinations builds all size**k tuples first: 9 s at 7 of 14)
        table = torch.tensor(list(itertools.combinations(range(size), k)), dtype=torch.int64)
        local = table[torch.randint(table.shape[0], (units,), generator=generator)]
        return (torch.arange(units)[:, None] * size + local).view(-1)  # rows of the table ascend
    keys = torch.empty(0, dtype=torch.int64)
    short_units, short_by = torch.arange(units), torch.full((units,), k)
    while short_units.numel():
        draws = _draws(size, short_by)
        unit = torch.repeat_interleave(short_units, draws)
        local = torch.randint(size, (unit.numel(),), generator=generator)
        keys = _sorted_unique(torch.cat([keys, unit * size + local]))
        counts = torch.bincount(keys // size, minlength=units)
        short_units = (counts < k).nonzero().view(-1)
        short_by = k - counts[short_units]
    if keys.numel() == units * k:
        return keys
    # thin every unit to exactly k: the k smallest of random priorities, ordered by (unit, priority) in one sort
    if units == 1:
        return keys[torch.randperm(keys.numel(), generator=generator)[:k]].sort().values
    unit = keys // size
    order = ((unit << 31) | torch.randint(2**31, (keys.numel(),), generator=generator)).argsort()
    ranked = unit[order]
    rank = torch.arange(ranked.numel()) - torch.searchsorted(ranked, ranked)
    return keys[order[rank < k]].sort().values


def _one_large_unit(size: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``k`` of one unit's ``size`` positions, a piece of the unit at a time: the draws landing in each piece
    are multinomial in its length, each piece de-duplicates its own, and which ``k`` of the ``m`` distinct
    positions stay is split over the pieces by the multivariate hypergeometric law (a uniform ``k``-subset
    of them, by piece). Each piece draws from its own seed, so its distinct positions are counted in a first
    pass and drawn again in the second, where they are thinned into the output: the transient memory is a
    piece's, beside the output itself."""
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    n_pieces = -(-k // _PIECE)
    edges = [size * i // n_pieces for i in range(n_pieces + 1)]
    lengths = np.diff(edges)
    seeds = rng.integers(2**62, size=n_pieces).tolist()
    rounds: list[list[int]] = []  # per round of draws, the draws landing in each piece

    def distinct(i: int) -> tuple[torch.Tensor, torch.Generator]:
        """Piece ``i``'s distinct draws (local, sorted) over every round so far, and its generator after them."""
        gen = torch.Generator().manual_seed(seeds[i])
        draws = [torch.randint(int(lengths[i]), (landed[i],), generator=gen) for landed in rounds]
        return _sorted_unique(torch.cat(draws)), gen

    counts, short = [0] * n_pieces, k
    while short > 0:  # a round more only where the first falls short (odds below 1e-3)
        rounds.append(rng.multinomial(int(_draws(size, torch.tensor([short]))), lengths / size).tolist())
        counts = [distinct(i)[0].numel() for i in range(n_pieces)]
        short = k - sum(counts)
    stays = rng.multivariate_hypergeometric(counts, k, method="marginals")
    out, at = torch.empty(k, dtype=torch.int64), 0
    for i, n in enumerate(stays.tolist()):
        local, gen = distinct(i)
        out[at : at + n] = local[torch.randperm(local.numel(), generator=gen)[:n]].sort().values + edges[i]
        at += n
    return out


def _sorted_unique(t: torch.Tensor) -> torch.Tensor:
    """The distinct values of an int64 CPU tensor, ascending: numpy's sort of a copy and one comparison
    (torch.unique held several times the input in scratch, which the allocator kept resident after it
    returned; numpy 2.4's unique hashes, 40x slower here)."""
    a = np.sort(t.numpy())
    new = np.empty(a.shape, dtype=bool)
    new[:1] = True
    np.not_equal(a[1:], a[:-1], out=new[1:])
    return torch.from_numpy(a[new])


def _draws(size: int, short_by: torch.Tensor) -> torch.Tensor:
    """Draws with replacement that give ``short_by`` more distinct positions of ``size`` with high
    probability: the coupon collector's mean, ``size * ln(size / (size - k))`` (about ``k`` for a sparse
    unit, ``1.39 k`` at half of one), plus three standard deviations; a unit still short draws again."""
    if short_by.numel() == 1:  # one unit (a layer): in Python floats, the same formula
        mean = -size * math.log1p(-int(short_by) / size)
        return torch.tensor([math.ceil(mean + 3 * math.sqrt(mean)) + 4])
    k = short_by.to(torch.float64)
    mean = -size * torch.log1p(-k / size)
    return (mean + 3 * mean.sqrt()).ceil().long() + 4


def _subsets_at_most(size: int, k: int, limit: int) -> bool:
    """``comb(size, k) <= limit``, stopping as soon as the partial products pass it (``math.comb`` of a
    layer-wide unit, millions choose thousands, takes seconds)."""
    count = 1
    for i in range(k):
        count = count * (size - i) // (i + 1)  # comb(size, i + 1): exact at every step
        if count > limit:
            return False
    return True
