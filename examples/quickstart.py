"""sparsec quickstart: RigL at 90% sparsity (ERK) on scikit-learn's real `digits` data, on a CPU.

Trains the same MLP dense and sparse, prints test accuracy, the kept weights per layer and the
memory the weights hold, and writes the input layer's connectivity per pixel as a PNG (the figure
of the RigL blog post: RigL moves connections onto the informative pixels).

    python examples/quickstart.py [--epochs 40] [--out quickstart_connectivity.png]
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import sparsec


class MLP(nn.Module):
    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load_data(seed: int):
    digits = load_digits()  # 1,797 real 8x8 images shipped with scikit-learn: no download
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train(model, data, epochs: int, batch: int, seed: int, sparse: bool):
    x_train, y_train, _, _ = data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    steps = epochs * ((len(y_train) + batch - 1) // batch)
    masks = sparsec.MaskUpdater(model, opt, total_steps=steps, seed=seed) if sparse else None
    start_mask = model.fc1.mask().clone() if sparse else None
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=g).split(batch):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            if masks is not None:
                masks.step()
            opt.zero_grad()
    return start_mask


@torch.no_grad()
def accuracy(model, data) -> float:
    _, _, x_test, y_test = data
    return (model(x_test).argmax(1) == y_test).float().mean().item()


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer: values, biases and the integer index buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def plot_connectivity(start: torch.Tensor, end: torch.Tensor, path: str, sparsity: float) -> None:
    """Connections per input pixel before and after training, on one shared colour scale."""
    counts = [m.sum(0).view(8, 8).numpy() for m in (start, end)]
    low, high = min(c.min() for c in counts), max(c.max() for c in counts)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6), layout="constrained")
    for ax, count, title in zip(axes, counts, ("initial (random)", "after RigL"), strict=True):
        im = ax.imshow(count, cmap="viridis", vmin=low, vmax=high)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.046, label=f"connections per input pixel (of {end.shape[0]} outputs)")
    density = float(end.float().mean())
    title = f"Input layer (fc1: {density:.0%} dense under {sparsity:.0%} ERK) of a sparse MLP on digits"
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="quickstart_connectivity.png")
    args = parser.parse_args()
    data = load_data(args.seed)

    torch.manual_seed(args.seed)
    dense = MLP()
    t0 = time.perf_counter()
    train(dense, data, args.epochs, args.batch, args.seed, sparse=False)
    t_dense = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    model = sparsec.sparsify(MLP(), spec=f"{args.sparsity:.0%}", policy=sparsec.rigl(delta_t=50), distribution="erk")
    t0 = time.perf_counter()
    start_mask = train(model, data, args.epochs, args.batch, args.seed, sparse=True)
    t_sparse = time.perf_counter() - t0

    print(f"dense  MLP: test accuracy {accuracy(dense, data):.3f}  ({t_dense:.1f} s)")
    print(f"sparse MLP: test accuracy {accuracy(model, data):.3f}  ({t_sparse:.1f} s, RigL, {args.sparsity:.0%} ERK)")
    print("kept weights per layer (ERK keeps small layers denser; a layer at density 1 stays dense):")
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(model, name)
        total = layer.in_features * layer.out_features
        sparse = isinstance(layer, sparsec.SparseLinear)
        kept, spec = (layer.layout.nnz, sparsec.describe_spec(layer.spec)) if sparse else (total, "dense")
        print(f"  {name}: {kept:>7,} of {total:>7,} ({kept / total:6.1%})  spec {spec}")
    print(
        f"memory held by weights: dense {weight_bytes(dense) / 1024:.0f} KiB, "
        f"sparse {weight_bytes(model) / 1024:.0f} KiB (values, biases and index buffers)"
    )
    plot_connectivity(start_mask, model.fc1.mask(), args.out, args.sparsity)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
