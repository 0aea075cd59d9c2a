"""The Policy protocol: what every policy module implements for ``sparsify`` and ``MaskUpdater``.

A policy value (its parameters, checks and string form) is ``sparsec.spec.Policy``; its behaviour is
the subclass of ``Policy`` below in the policy's own module. Values are frozen and shared (one
``sparsec.rigl`` serves every layer of every model), so whatever a policy keeps across steps lives in
a per-layer state object it creates (``layer_state``), which the updater holds and checkpoints.

At sparsify time ``prepare`` builds the sparse model (snip chooses the mask, small_dense narrows the
dense model instead). In training, for every step ``t`` the updater

1. arms each layer one step ahead (``arm`` with ``ctx.t = t``): the policy decides the drop from the
   weights step ``t``'s forward will use and returns a ``Capture`` that step's backward feeds
   (``layer.grow_capture``), or a reason to skip the update, or None;
2. after the optimizer step, hands every due layer to its policy class at once (``update``: snfs
   redistributes across all its layers) with what it armed, and applies the returned ``Change``s
   (``relayout.apply_change``) or warns once per layer about a skip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed
from torch import nn

from sparsec.errors import SparsecError
from sparsec.nn.layers import SparseLayer
from sparsec.spec import Spec
from sparsec.spec.policy import Policy as PolicyValue

# sparsify's module replacement: ``replace(initial=None)`` puts the sparse layers in, each starting from
# ``initial(name, layout)`` (sorted kept item positions) or, without it, a random topology; returns the model
Replace = Callable[..., nn.Module]


@dataclass(frozen=True)
class Context:
    """What a policy sees of the updater at step ``t`` (the step being armed, or updated)."""

    t: int
    total_steps: int
    optimizer: torch.optim.Optimizer | None
    generator: torch.Generator  # the updater's seeded generator: SET's random scores, checkpointed
    last_layer: str  # the model's last sparse layer (srigl never ablates its outputs)


class Capture:
    """What a policy arms on a layer; ``update`` gets it back at the update step.

    Installed on ``layer.grow_capture`` while ``observes``: the layer hands ``observe`` the ``dY``
    and ``X`` of every backward through it. A plan that needs no backward (SET's random growth) sets
    ``observes = False`` and is only handed back.
    """

    observes: ClassVar[bool] = True
    # the data-parallel group whose ranks split the batch, over which what it observes is gathered (set by
    # MaskUpdater from its ``process_group``; None: the default group)
    process_group: torch.distributed.ProcessGroup | None = None

    def observe(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        """Take one backward's ``dY`` and ``X`` (every backward through the layer before the update)."""


class StepActivations(Capture):
    """Keeps the ``dY`` and ``X`` of every backward through the layer in the armed step, so the grow
    score is ``|the step's dense gradient|``: with weight sharing or gradient accumulation over
    micro-batches the layer's backward runs several times, and ``sum_c dY_c^T X_c`` is
    ``[dY_1; dY_2; ...]^T [X_1; X_2; ...]``. Memory: the calls' rows, O(batch x (in + out)), never
    an out x in tensor."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gathered = False  # the calls hold every rank's rows (see activations)

    def observe(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        self.calls.append((dy.detach().clone(), x.detach().clone()))  # held past the backward: own copies

    def activations(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The calls' ``dY`` and ``X``, rows concatenated (None: no backward ran); kept as one pair. Under
        torch.distributed (DDP: every rank saw its shard of the global batch) the rows of every rank, in
        rank order (``rows_of_every_rank``), so every rank scores the global batch's gradient."""
        if not self.calls:
            return None
        if len(self.calls) > 1:
            dy, x = (torch.cat(t) for t in zip(*self.calls, strict=True))
            self.calls = [(dy, x)]
        if not self.gathered:
            self.calls = [tuple(rows_of_every_rank(t, self.process_group) for t in self.calls[0])]
            self.gathered = True
        return self.calls[0]

    def release(self) -> None:
        """Let go of the held rows once the update has used them, so its later arrays (the merged positions,
        the remapped values) can take their memory."""
        self.calls = []


def rows_of_every_rank(t: torch.Tensor, group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """``t``'s rows from every rank of ``group`` (None: the default process group), concatenated in the
    group's rank order (``t`` itself outside torch.distributed or with one rank); ranks may hold different
    row counts.

    Why gather the update step's ``dY`` and ``X`` (``B x (out + in)`` values per rank) rather than
    all-reduce ``|dY^T X|``: the grow score is a function of the global batch's product, which the gathered
    rows give every rank exactly (the fused scan then runs on each), while an all-reduce would move the
    ``out x in`` product itself. For a 4096 x 4096 layer at 64 rows per rank, fp32: 2 MB sent per rank
    against 64 MB reduced (a ring all-reduce moves about twice the tensor per rank); the gather costs less
    until the global batch passes ``out * in / (out + in)`` rows (2048 here), beyond the batches a grow
    step sees. The collective runs on update steps only, on every rank, layer by layer in model order."""
    world = world_size(group)
    if world < 2:
        return t
    counts = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    torch.distributed.all_gather(counts, torch.tensor([t.shape[0]], device=t.device), group=group)
    rows = [int(c) for c in counts]
    padded = t.new_zeros((max(rows), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])


def check_ranks_agree(
    layers: Mapping[str, SparseLayer], t: int, group: torch.distributed.ProcessGroup | None = None
) -> None:
    """Raise ``SparsecError`` unless every rank of ``group`` (None: the default process group) holds the same
    kept count and values sum in every layer: one
    all-gather of two numbers a layer, after a step that replaced values Parameters (a DDP wrapper still
    built over the old ones leaves the new values' gradients unreduced, so the ranks drift apart)."""
    device = next(iter(layers.values())).values.device  # NCCL gathers device tensors only
    mine = torch.tensor(
        [
            [float(layer.values.numel()), layer.whole_values().detach().double().sum().item()]
            for layer in layers.values()
        ],
        dtype=torch.float64,
        device=device,
    )
    every = (
        rows_of_every_rank(mine[None], group).view(world_size(group), *mine.shape).view(torch.int64)
    )  # bits: NaN == NaN
    apart = [name for i, name in enumerate(layers) if not bool((every[:, i] == every[0, i]).all())]
    if apart:
        raise SparsecError(
            f"after step {t}'s density change the ranks hold different values in {apart}: the "
            f"DistributedDataParallel wrapper still holds the old values Parameters, so the new ones train "
            f"unsynchronised. Build it again after a step where updater.storage_changed is True "
            f"(ddp = DistributedDataParallel(model, init_sync=False, ...))"
        )


def world_size(group: torch.distributed.ProcessGroup | None = None) -> int:
    """Ranks of ``group`` (None: the default torch.distributed process group; 1 outside torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class Change:
    """A layer's new mask, applied by ``relayout.apply_change``.

    ``flat``: the new sorted item positions; ``src[i]``: the old slot of item ``i``, ``-1`` for a grown
    one (it starts at 0 with zero optimizer state). ``spec``: the layer's new storage when its density
    changes (None: the same layout). ``flat=None`` with a spec: the counts stay and only the recorded
    spec moves on (gmp between two sparsities of the same kept count); the updater reports nothing.
    ``dropped`` goes to ``MaskUpdater.last_dropped``; ``changed`` (positions grown, or ``pruned`` for a
    policy that only prunes) to ``last_changes``.
    """

    flat: torch.Tensor | None
    src: torch.Tensor | None
    dropped: int = 0
    spec: Spec | None = None
    pruned: int = 0

    @property
    def changed(self) -> int:
        return self.pruned or int((self.src < 0).count_nonzero())  # a bool sum() casts to int64 first


class Policy(PolicyValue):
    """The behaviour of a policy. The defaults are a policy whose mask never changes after ``prepare``."""

    def prepare(
        self, model: nn.Module, targets: Mapping[str, nn.Module], specs: Mapping[str, Spec], replace: Replace
    ) -> nn.Module:
        """Whole-model setup in ``sparsify``: ``targets`` are the Linear/Conv2d modules by name, ``specs``
        their planned specs. Returns the model; the default replaces the targets, random topology."""
        return replace()

    def layer_state(self, layer: SparseLayer, optimizer: torch.optim.Optimizer | None):
        """State the policy keeps for ``layer`` across steps (``state_dict``/``load_state_dict``, saved in
        the updater's checkpoint), made when the updater is built; None: nothing."""
        return None

    def arm(self, layer: SparseLayer, ctx: Context, state) -> Capture | str | None:
        """One step ahead of ``ctx.t``: a capture for step ``ctx.t``'s backward, a reason to skip that
        update (reported at step ``ctx.t``), or None (nothing to capture)."""
        return None

    @classmethod
    def update(
        cls, due: Mapping[str, SparseLayer], captures: Mapping[str, Capture | None], ctx: Context
    ) -> dict[str, Change | str]:
        """The update of step ``ctx.t`` for every due layer of this policy class, in model order, with
        what each armed; each layer's parameters are its own ``layer.policy``. A layer left out is
        unchanged and not reported; a string skips it with a warning."""
        return {}
