"""Quality of every policy on real data: scikit-learn's `digits`, an MLP, 80/90/95/98% sparsity (ERK),
5 seeds each, plus dense and a width-matched small dense MLP. Writes bench/RESULTS.md and bench/quality.png.

    python bench/quality.py [--epochs 30] [--seeds 5] [--hidden 256]

Same data split, model, optimizer (SGD, momentum 0.9, lr 0.05, batch 64) and epochs for every method;
no per-method tuning and no seed picking; every dynamic method updates its masks every DELTA_T = 50 steps.
imp prunes 5 times (fraction 1 - (1 - s)^(1/5)), so it trains 6 rounds (the dense start and one after each
prune) of half the epochs each and spends 3x the others' steps: its FLOPs column says so. Training FLOPs count every
step's forward, input gradient and kept-weight gradient from the cost model's useful FLOPs, plus the
dense |dY^T X| of RigL's grow steps.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import sympy
import torch
from results import machine, write_section
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import sparsec
from sparsec.ir.build import build_programs
from sparsec.ir.graph import SYM
from sparsec.passes import lower

SPARSITIES = [0.8, 0.9, 0.95, 0.98]
POLICIES = ["static", "set", "rigl", "srigl", "snfs", "gmp", "snip", "imp", "small_dense"]
POLICIES += ["set+fresh", "rigl+fresh", "srigl+fresh", "snfs+fresh"]
POLICIES += ["static+sparse", "rigl+sparse", "srigl+dense"]  # the other init of each (defaults: dense, dense, sparse)
DELTA_T = 50  # steps between mask updates, for every dynamic method (set, rigl, srigl, snfs, gmp)
FRESH = "+fresh"  # the same policy with regrow_dropped=False (fresh positions first: sparsec's old default)
BATCH_SIZE = 64


def data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    tr, te = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=digits.target)
    return x[tr], y[tr], x[te], y[te]


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@functools.cache
def step_flops(spec: str, out: int, inn: int) -> float:
    """Useful FLOPs of one training step of one sparse layer (forward, dX, dV) at BATCH_SIZE."""
    total = 0
    for name, program in build_programs(spec, inn, out, "fp32", bias=False).items():
        if name == "grow_scores":
            continue
        lowered, _ = lower(program)
        cost = next(dict(lowered.node(n).attr("cost")) for n in lowered.order() if lowered.node(n).attr("cost"))
        total += float(sympy.sympify(cost["useful_flops"]).subs({SYM.BATCH: BATCH_SIZE, SYM.OUT: out, SYM.IN: inn}))
    return total


def model_flops(model: nn.Module) -> float:
    flops = 0.0
    for m in model.modules():
        if isinstance(m, sparsec.SparseLinear):
            flops += step_flops(str(m.spec), m.out_features, m.in_features)
        elif isinstance(m, nn.Linear):
            flops += 3 * 2 * BATCH_SIZE * m.in_features * m.out_features
    return flops


def kept_params(model: nn.Module) -> int:
    return sum(
        m.layout.nnz if isinstance(m, sparsec.SparseLinear) else m.weight.numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, sparsec.SparseLinear))
    )


def build(policy: str, sparsity: float, hidden: int, seed: int, d) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp(hidden)
    if policy == "dense":
        return model
    spec = f"unstructured({sparsity})"
    regrow = not policy.endswith(FRESH)
    policy = policy.removesuffix(FRESH)
    init = next((i for i in ("sparse", "dense") if policy.endswith("+" + i)), None)  # None: the policy's default
    policy = policy.split("+")[0]
    if policy == "srigl":  # constant fan-in, at the same ERK densities
        srigl = sparsec.srigl(delta_t=DELTA_T, regrow_dropped=regrow)
        return sparsec.sparsify(model, spec=f"fanin({sparsity})", policy=srigl, distribution="erk", init=init)
    if policy == "snip":
        x, y = d[0][:256], d[1][:256]
        loss = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731 - one batch, as SNIP does
        return sparsec.sparsify(model, spec=spec, policy=sparsec.snip(loss=loss), distribution="erk")
    if policy == "imp":
        fraction = 1.0 - (1.0 - sparsity) ** (1 / 5)
        return sparsec.sparsify(model, spec=spec, policy=sparsec.imp(fraction=fraction), distribution="erk")
    named = {
        "snfs": sparsec.snfs(delta_t=DELTA_T, regrow_dropped=regrow),
        "static": sparsec.static,
        "set": sparsec.set_(delta_t=DELTA_T, regrow_dropped=regrow),
        "rigl": sparsec.rigl(delta_t=DELTA_T, regrow_dropped=regrow),
        "gmp": sparsec.gmp(delta_t=DELTA_T),
    }
    return sparsec.sparsify(model, spec=spec, policy=named[policy], distribution="erk", init=init)


class Run(NamedTuple):
    accuracy: float
    kept: int
    flops: float
    updates: int = 0  # layer updates that dropped weights
    unchanged: int = 0  # ... of which left the mask as it was


def train(model: nn.Module, d, epochs: int, seed: int, policy: str) -> tuple[float, int, int]:
    """Train; returns training FLOPs, layer updates that dropped weights, and how many changed nothing."""
    x_tr, y_tr, _, _ = d
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps_per_epoch = (len(y_tr) + BATCH_SIZE - 1) // BATCH_SIZE
    g = torch.Generator().manual_seed(seed)
    flops = 0.0
    counts = [0, 0]

    def run(n_epochs: int, updater=None) -> float:
        spent = 0.0
        for _ in range(n_epochs):
            for idx in torch.randperm(len(y_tr), generator=g).split(BATCH_SIZE):
                nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
                opt.step()
                spent += model_flops(model)
                if updater is not None:
                    armed = [m for m in model.modules() if getattr(m, "grow_capture", None) is not None]
                    spent += sum(2 * BATCH_SIZE * m.in_features * m.out_features for m in armed)
                    before = {n: m.positions().clone() for n, m in updater.layers.items()}
                    updater.step()
                    for name, dropped in updater.last_dropped.items():  # the layers updated at this step
                        counts[0] += dropped > 0
                        counts[1] += dropped > 0 and torch.equal(before[name], updater.layers[name].positions())
                opt.zero_grad()
        return spent

    if policy == "imp":
        rounds = 0
        for _ in sparsec.imp_rounds(model, opt):
            flops += run(max(1, epochs // 2))
            rounds += 1
        return flops, rounds, 0  # rounds trained, reported in the table's text
    has_sparse = any(isinstance(m, sparsec.SparseLinear) for m in model.modules())
    updater = sparsec.MaskUpdater(model, opt, total_steps=epochs * steps_per_epoch, seed=seed) if has_sparse else None
    flops = run(epochs, updater)
    return flops, counts[0], counts[1]


@torch.no_grad()
def accuracy(model: nn.Module, d) -> float:
    return (model(d[2]).argmax(1) == d[3]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--png", default=str(Path(__file__).with_name("quality.png")))
    args = parser.parse_args()
    d = data()
    t0 = time.perf_counter()
    results: dict[tuple[str, float], list[Run]] = {}
    for seed in range(args.seeds):
        model = build("dense", 0.0, args.hidden, seed, d)
        flops, _, _ = train(model, d, args.epochs, seed, "dense")
        results.setdefault(("dense", 0.0), []).append(Run(accuracy(model, d), kept_params(model), flops))
    for sparsity in SPARSITIES:
        for policy in POLICIES:
            for seed in range(args.seeds):
                if policy == "small_dense":  # dense layers, narrower: trained like dense
                    model = sparsec.sparsify(
                        mlp(args.hidden), spec=f"unstructured({sparsity})", policy="small_dense", distribution="erk"
                    )
                    torch.manual_seed(seed)
                    for m in model:
                        if isinstance(m, nn.Linear):
                            m.reset_parameters()
                    counted = train(model, d, args.epochs, seed, "dense")
                else:
                    model = build(policy, sparsity, args.hidden, seed, d)
                    counted = train(model, d, args.epochs, seed, policy)
                run = Run(accuracy(model, d), kept_params(model), *counted)
                results.setdefault((policy, sparsity), []).append(run)
            accs = [r.accuracy for r in results[(policy, sparsity)]]
            print(
                f"{policy:>11} {sparsity:.0%}: {statistics.mean(accs):.4f} +- {statistics.stdev(accs):.4f}", flush=True
            )
    elapsed = time.perf_counter() - t0

    dense = results[("dense", 0.0)]
    dense_flops = statistics.mean(r.flops for r in dense) / 1e9
    rows = [f"| dense | 0% | {_cell(dense)} | {dense[0].kept:,} | {dense_flops:.1f} | - |"]
    for sparsity in SPARSITIES:
        for policy in POLICIES:
            runs = results[(policy, sparsity)]
            updates = 0 if policy == "imp" else sum(r.updates for r in runs)
            unchanged = f"{sum(r.unchanged for r in runs)} / {updates}" if updates else "-"
            rows.append(
                f"| {policy} | {sparsity:.0%} | {_cell(runs)} | {round(statistics.mean(r.kept for r in runs)):,} "
                f"| {statistics.mean(r.flops for r in runs) / 1e9:.1f} | {unchanged} |"
            )
    trained = sorted({r.updates for s in SPARSITIES for r in results[("imp", s)]})  # imp: rounds trained
    imp_rounds = f"{trained[0]}" if len(trained) == 1 else f"{trained[0]}-{trained[-1]}"
    imp_steps = trained[-1] * max(1, args.epochs // 2) / args.epochs
    _plot(results, args.png)
    body = "\n".join(
        [
            "## Policy quality on digits (real data)",
            "",
            f"Measured {datetime.date.today().isoformat()} on {machine()} with `python bench/quality.py "
            f"--epochs {args.epochs} --seeds {args.seeds} --hidden {args.hidden}` ({elapsed / 60:.1f} min): "
            f"MLP 64-{args.hidden}-{args.hidden}-10, ERK, SGD momentum 0.9, lr 0.05, batch 64, {args.epochs} epochs, "
            f"mask updates every {DELTA_T} steps, the same for every method; test accuracy on the 25% held-out "
            "split, mean +- std over seeds "
            f"0..{args.seeds - 1}.",
            "",
            "| policy | sparsity | test accuracy | kept weights | training GFLOPs | unchanged updates |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "srigl uses fanin(s) specs at the same ERK densities (kept counts round per row). small_dense is the",
            "same MLP with the hidden width that matches the sparse model's kept weights (dense layers, so its FLOPs",
            f"are dense). imp trains {imp_rounds} rounds of {max(1, args.epochs // 2)} epochs (its dense start and one "
            f"after each prune: up to {imp_steps:.1f}x the steps). "
            "set, rigl, srigl and snfs run the published rule (regrow_dropped=True, the default: just-dropped",
            "weights compete for regrowth, as in google-research/rigl); `+fresh` rows run the same policy with",
            "regrow_dropped=False (fresh positions first, sparsec's default before 2026-12-01). Unchanged updates:",
            "layer updates that dropped weights but left the mask as it was, over all layer updates that dropped",
            "weights (all seeds). Initial values: each policy's reference default (`init=None`: srigl `sparse`,",
            "each output rescaled for its kept fan-in, as condensed-sparsity; the others `dense`, the dense init at",
            "the kept positions, as google-research/rigl); `+sparse` and `+dense` rows run the other init.",
            "Plot: bench/quality.png.",
        ]
    )
    write_section("quality", body)
    print(f"wrote bench/RESULTS.md and {args.png}")


def _cell(runs) -> str:
    accs = [r.accuracy for r in runs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.4f} +- {std:.4f}"


def _plot(results, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {}  # a +regrow variant takes its policy's colour, dotted
    for policy in POLICIES:
        accs = [[r.accuracy for r in results[(policy, s)]] for s in SPARSITIES]
        means = [statistics.mean(a) for a in accs]
        stds = [statistics.stdev(a) if len(a) > 1 else 0 for a in accs]
        style = ":" if policy.endswith(FRESH) else "--" if "+" in policy else "-"
        x = [s * 100 for s in SPARSITIES]
        color = colors.setdefault(policy.split("+")[0], f"C{len(colors)}")
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, linestyle=style, color=color, label=policy)
    dense = statistics.mean(r.accuracy for r in results[("dense", 0.0)])
    ax.axhline(dense, color="k", linestyle="--", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits MLP: test accuracy against sparsity (mean +- std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
