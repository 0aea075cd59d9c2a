"""Sparse training under DistributedDataParallel: every rank ends each update with the same mask.

    torchrun --standalone --nproc-per-node 2 examples/ddp.py [--spec 90%] [--policy rigl] [--steps 300]

Each rank trains on its shard of every global batch (digits, from scikit-learn: nothing downloaded); RigL's
grow step gathers the update step's dY and X from every rank, so every rank scores the global batch's
gradient and decides the same drops and grows (the drops follow from the weights, which DDP keeps equal).
A policy that changes layer densities (snfs, srigl with ablation) gives layers new values Parameters, so the
loop builds the DDP wrapper again when ``updater.storage_changed``. gloo on CPU, NCCL where every rank has a
GPU. At the end rank 0 prints the test accuracy and every rank's mask digest, which agree.
"""

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import sparsec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="90%")
    parser.add_argument("--policy", default="rigl", choices=["rigl", "set", "snfs", "srigl"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="the global batch, split over the ranks")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

    torch.manual_seed(0)  # the same initial model and mask on every rank (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    policy = {"rigl": sparsec.rigl, "set": sparsec.set_, "snfs": sparsec.snfs, "srigl": sparsec.srigl}[args.policy]
    sparsec.sparsify(model, spec=args.spec, policy=policy(delta_t=10), dense=["4"])
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    updater = sparsec.MaskUpdater(model, opt, total_steps=args.steps)
    net = nn.parallel.DistributedDataParallel(model)

    gen = torch.Generator().manual_seed(1)  # the same global batches on every rank; each takes its shard
    shard = args.batch // world
    for _ in range(args.steps):
        idx = torch.randint(len(x_train), (args.batch,), generator=gen)[rank * shard : (rank + 1) * shard]
        loss = nn.functional.cross_entropy(net(x_train[idx].to(device)), y_train[idx].to(device))
        loss.backward()
        opt.step()
        updater.step()
        if updater.storage_changed:  # new values Parameters (a density change): DDP must know them
            net = nn.parallel.DistributedDataParallel(model, init_sync=False)
        opt.zero_grad()

    masks = b"".join(m.positions().cpu().numpy().tobytes() for m in updater.layers.values())
    digest = torch.tensor(list(hashlib.sha256(masks).digest()[:8]), dtype=torch.int64, device=device)
    every = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(every, digest)
    with torch.no_grad():
        accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
    if rank == 0:
        same = all(torch.equal(d, every[0]) for d in every)
        print(f"{world} ranks, spec {args.spec}, {args.policy}: test accuracy {accuracy:.3f}; ", end="")
        print(f"masks identical on every rank: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
