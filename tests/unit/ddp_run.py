"""Helper for test_distributed: train the MLP 32-128-128-10 with one spec and policy, on one process or as
ranks of a gloo group under DistributedDataParallel, and write every sparse layer's kept positions after
each update step.

python ddp_run.py SPEC POLICY WORLD OUT        # WORLD = 1: one process on the whole batch; else WORLD ranks
                                               # (torch.multiprocessing) on its shards, rank r writes OUT.r

Every rank sees an equal shard of the same global batch (rows r::WORLD are not used: shards are
contiguous, so the ranks' rows concatenated in rank order are the global batch in order).
"""

import os
import sys

import torch
from torch import nn

import sparsec

STEPS, GLOBAL_BATCH = 12, 48  # 48: shards for 1, 2 and 3 ranks


def policy_of(name: str):
    return {
        "rigl": sparsec.rigl(delta_t=3),
        "set": sparsec.set_(delta_t=3),
        "snfs": sparsec.snfs(delta_t=3),
        "srigl": sparsec.srigl(delta_t=3),
    }[name]


def train(spec: str, policy: str, rank: int, world: int) -> list[dict[str, list[int]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    sparsec.sparsify(model, spec=spec, policy=policy_of(policy), dense=["4"])
    model = model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updater = sparsec.MaskUpdater(model, opt, total_steps=STEPS * 2)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 10, generator=gen, dtype=torch.float64)
    shard = GLOBAL_BATCH // world
    masks = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 32, generator=gen, dtype=torch.float64)
        y = (x @ teacher).argmax(1)
        xs, ys = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        loss = nn.functional.cross_entropy(net(xs), ys)
        loss.backward()
        opt.step()
        if updater.step():
            masks.append({n: m.positions().tolist() for n, m in updater.layers.items()})
        opt.zero_grad()
    return masks


def _rank(rank: int, spec: str, policy: str, world: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(train(spec, policy, rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    spec, policy, world, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    if world == 1:
        torch.save(train(spec, policy, 0, 1), out)
    else:
        import socket

        with socket.socket() as s:  # a free port for this group
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        torch.multiprocessing.spawn(_rank, args=(spec, policy, world, out), nprocs=world)
