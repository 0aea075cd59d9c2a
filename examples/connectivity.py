"""The RigL blog figure: how many connections each input pixel keeps, at the start, middle and end of
training a 98%-sparse MLP with RigL on scikit-learn's `digits` (real data, no download).

    python examples/connectivity.py [--sparsity 0.98] [--epochs 60] [--out connectivity.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import sparsec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="connectivity.png")
    args = parser.parse_args()

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Linear(64, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 10),
    )
    # uniform sparsity keeps the input layer sparse enough for the picture to mean something
    sparsec.sparsify(model, spec=f"unstructured({args.sparsity})", policy=sparsec.rigl(delta_t=25), dense=["4"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = 64
    steps_per_epoch = (len(y) + batch - 1) // batch
    total = args.epochs * steps_per_epoch
    masks = sparsec.MaskUpdater(model, opt, total_steps=total, seed=args.seed)
    snapshots = {"start": model[0].mask().sum(0).view(8, 8).float()}
    g = torch.Generator().manual_seed(args.seed)
    step = 0
    for _ in range(args.epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            masks.step()
            opt.zero_grad()
            step += 1
            if step == total // 2:
                snapshots["middle"] = model[0].mask().sum(0).view(8, 8).float()
    snapshots["end"] = model[0].mask().sum(0).view(8, 8).float()
    accuracy = (model(x).argmax(1) == y).float().mean().item()

    vmax = max(s.max().item() for s in snapshots.values())
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2), layout="constrained")
    for ax, (name, counts) in zip(axes[:3], snapshots.items(), strict=True):
        im = ax.imshow(counts.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{name} of training", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    axes[3].imshow(x.mean(0).view(8, 8).numpy(), cmap="gray")
    axes[3].set_title("mean input image", fontsize=9)
    axes[3].set_xticks([]), axes[3].set_yticks([])
    fig.colorbar(im, ax=axes[2], fraction=0.046, label="connections per pixel")
    fig.suptitle(
        f"RigL at {args.sparsity:.0%} sparsity on digits: the input layer's connections per pixel "
        f"(train accuracy {accuracy:.3f})",
        fontsize=10,
    )
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}; train accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
