"""Helper for test_distributed: train the MLP 32-128-128-10 with one spec and policy, on one process or as
ranks of a gloo group under DistributedDataParallel, and write every sparse layer's kept positions after
each update step.

python ddp_run.py SPEC POLICY WORLD OUT [ACC]  # WORLD = 1: one process on the whole batch; else WORLD ranks
                                               # (torch.multiprocessing) on its shards, rank r writes OUT.r;
                                               # ACC micro-batches per rank and step (DDP's no_sync for all
                                               # but the last), the loss divided by ACC

Environment: DDP_BATCH=N sets the global batch (48); DDP_ADAM=1 trains with Adam (else SGD
with momentum); DDP_MOMENTUM=PATH saves the policies' states (snfs's momentum shadows) to PATH.RANK at the end;
DDP_WRAP=fsdp shards with FSDP2 instead of DDP; DDP_GROUPS=G splits the ranks into G data-parallel groups of
consecutive ranks (torch.distributed.new_group), each a replica of its own under DDP(process_group=...) and
MaskUpdater(process_group=...), group g training on the data of generator seed 1 + g. Checkpoints:
DDP_SAVE_AT=T DDP_CKPT=PATH saves the model, optimizer and updater state after
step T (rank 0, from the inner model); DDP_RESUME=PATH loads such a checkpoint into the fresh objects and
trains on from the step after it (the data generator replays the steps before). OUT holds (step, masks)
for every update step. A density change (snfs, srigl's ablation) builds the DDP wrapper again over the new
values Parameters, as README says to; DDP_KEEP_WRAPPER=1 keeps the stale one (the updater must refuse it).

Every rank sees an equal shard of the same global batch (rows r::WORLD are not used: shards are
contiguous, so the ranks' rows concatenated in rank order are the global batch in order).
"""

import contextlib
import os
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import sparsec

STEPS = 12
GLOBAL_BATCH = int(os.environ.get("DDP_BATCH", 48))  # 48: shards for 1, 2 and 3 ranks


def policy_of(name: str):
    return {
        "rigl": sparsec.rigl(delta_t=3),
        "set": sparsec.set_(delta_t=3),
        "snfs": sparsec.snfs(delta_t=3),
        "srigl": sparsec.srigl(delta_t=3),
    }[name]


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    if os.environ.get("DDP_ADAM"):
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def data_parallel_group(rank: int, world: int):
    """(this rank's data-parallel group or None, its rank in it, the group's size, the group's index)."""
    groups = int(os.environ.get("DDP_GROUPS", 1))
    if world == 1 or groups == 1:
        return None, rank, world, 0
    size = world // groups
    every = [torch.distributed.new_group(list(range(g * size, (g + 1) * size))) for g in range(groups)]
    return every[rank // size], rank % size, size, rank // size


def train(spec: str, policy: str, rank: int, world: int, acc: int = 1) -> list[dict[str, list[int]]]:
    group, local, world, replica = data_parallel_group(rank, world)  # rank: global (files); local: its shard
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    sparsec.sparsify(model, spec=spec, policy=policy_of(policy), dense=["4"])
    model = model.double()
    if os.environ.get("DDP_OPT_FIRST"):  # the optimizer before fully_shard: it holds the replaced Parameters
        opt = optimizer(model)
    net = model
    fsdp = world > 1 and os.environ.get("DDP_WRAP") == "fsdp"
    if fsdp:  # FSDP2: each sparse layer and the root sharded on a 1-D mesh of the ranks (new Parameters, so
        mesh = init_device_mesh("cpu", (world,))  # the optimizer comes after)
        for m in model:
            if isinstance(m, sparsec.SparseLinear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif world > 1:
        net = nn.parallel.DistributedDataParallel(model, process_group=group)
    if not os.environ.get("DDP_OPT_FIRST"):
        opt = optimizer(model)
    updater = sparsec.MaskUpdater(model, opt, total_steps=STEPS * 2, process_group=group)
    gen = torch.Generator().manual_seed(1 + replica)
    teacher = torch.randn(32, 10, generator=gen, dtype=torch.float64)
    shard = GLOBAL_BATCH // world
    masks = []
    save_at, resume = int(os.environ.get("DDP_SAVE_AT", 0)), os.environ.get("DDP_RESUME")
    start = 0
    if resume and os.path.isdir(resume):  # torch.distributed.checkpoint: every rank (or one process) loads its part
        model_state, opt_state = get_state_dict(model, opt)
        dcp.load({"model": model_state, "optimizer": opt_state}, checkpoint_id=resume)
        set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state)
        updater.load_state_dict(torch.load(f"{resume}/updater.pt", weights_only=False))
        start = updater.t
    elif resume:
        state = torch.load(resume, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        updater.load_state_dict(state["updater"])
        start = updater.t
    for step in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 32, generator=gen, dtype=torch.float64)
        y = (x @ teacher).argmax(1)
        if step < start:  # before the checkpoint: only the data is replayed
            continue
        xs, ys = x[local * shard : (local + 1) * shard], y[local * shard : (local + 1) * shard]
        micro = shard // acc
        for m in range(acc):
            part = slice(m * micro, (m + 1) * micro)
            sync = contextlib.nullcontext() if m == acc - 1 or world == 1 else net.no_sync()
            with sync:
                (nn.functional.cross_entropy(net(xs[part]), ys[part]) / acc).backward()
        opt.step()
        changed = updater.step()
        if world > 1 and updater.storage_changed and not os.environ.get("DDP_KEEP_WRAPPER"):
            net = nn.parallel.DistributedDataParallel(model, init_sync=False, process_group=group)  # new values
        if changed:
            masks.append((updater.t, {n: m.positions().tolist() for n, m in updater.layers.items()}))
        opt.zero_grad()
        if save_at and updater.t == save_at and fsdp:  # every rank writes its shards; the updater is replicated
            model_state, opt_state = get_state_dict(model, opt)
            dcp.save({"model": model_state, "optimizer": opt_state}, checkpoint_id=os.environ["DDP_CKPT"])
            if rank == 0:
                torch.save(updater.state_dict(), f"{os.environ['DDP_CKPT']}/updater.pt")
        elif save_at and updater.t == save_at and rank == 0:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "updater": updater.state_dict()}
            torch.save(state, os.environ["DDP_CKPT"])
    if os.environ.get("DDP_MOMENTUM"):  # snfs's dense momentum shadows at the end, every rank's own
        torch.save(updater.state_dict()["momentum"], f"{os.environ['DDP_MOMENTUM']}.{rank}")
    return masks


def _rank(rank: int, spec: str, policy: str, world: int, out: str, acc: int) -> None:
    import torch.distributed as dist

    # a file rendezvous: no port to pick (a free port probed and released can be taken before the group binds it)
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world)
    try:
        torch.save(train(spec, policy, rank, world, acc), f"{out}.{rank}")  # named by the global rank
        dist.barrier()  # no rank tears the group down under another's last collective
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    spec, policy, world, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    acc = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    torch.set_num_threads(1)
    if world == 1:
        torch.save(train(spec, policy, 0, 1, acc), out)
    else:
        if os.path.exists(f"{out}.rendezvous"):  # left by a killed run: the group would read its stale entries
            os.remove(f"{out}.rendezvous")
        torch.multiprocessing.spawn(_rank, args=(spec, policy, world, out, acc), nprocs=world)
