"""Values held sharded by FSDP2 (``fully_shard``): between forwards a layer's ``values`` Parameter (and the
optimizer's state of it) is a DTensor sharded on dim 0, each rank holding a chunk; index buffers are not
parameters, so FSDP2 leaves them whole on every rank (they replicate, and every rank decides the same masks).

An update reads the whole values (``whole``: the shards all-gathered, on update steps only) and writes its
result back into each rank's shard (``write_whole``, ``like``: no communication, every rank computed the same
whole tensor). Outside FSDP2 every function here is the identity on plain tensors.
"""

from __future__ import annotations

import sys

import torch


def _dtensors():
    # Nothing can be a DTensor before torch.distributed.tensor is imported (FSDP2 imports it); importing it
    # here would cost every process 40 MB of RSS
    return sys.modules.get("torch.distributed.tensor")


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded parameter or optimizer state)."""
    dtensors = _dtensors()
    return dtensors is not None and isinstance(t, dtensors.DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor's shards gathered from every rank (a collective: every rank calls it), or ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def like(t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` (whole, the same on every rank) sharded as ``t`` is: this rank's chunk as a DTensor of ``t``'s
    mesh and placements, taken locally (``src_data_rank=None``: no communication); ``new`` if ``t`` is plain."""
    if not is_sharded(t):
        return new
    return _dtensors().distribute_tensor(new, t.device_mesh, t.placements, src_data_rank=None)


@torch.no_grad()
def write_whole(t: torch.Tensor, new: torch.Tensor) -> None:
    """Write the whole ``new`` into ``t`` in place (a DTensor: into this rank's shard)."""
    t.copy_(like(t, new))
