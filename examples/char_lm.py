"""A character language model on real English text: dense, static, SET, RigL at 90% ERK, small_dense.

The text is Python's own documentation (``pydoc_data.topics``, ~465 KB, ships with Python); the last
10% is held out. A decoder-only transformer (pre-norm ``nn.TransformerEncoderLayer`` blocks with a
causal mask) is trained with one recipe for every method (AdamW, warm-up then cosine, the same steps,
batches and seed); only the sparsity differs. ``sparsify`` makes every projection of the blocks
sparse (attention q, k, v, out and both feed-forward layers) at 90% overall, ERK-distributed, with the
policies' defaults (delta_t=100, alpha=0.3, t_end=0.75, their default init); the embedding and the
output head stay dense. ``small_dense`` is the same transformer narrowed until its block weights fit
RigL's kept-weight budget. Reported: validation loss and bits per character on the whole held-out
text, training FLOPs of the weight and attention products from sparsec's cost model (relative to
dense), wall time, and a plot of the validation curves.

    python examples/char_lm.py                       # the comparison; table into bench/RESULTS.md
    python examples/char_lm.py --steps 30 --no-results --methods dense,rigl   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import pydoc_data.topics

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import sparsec

METHODS = ("dense", "static", "set", "rigl", "small_dense")
POLICIES = {"static": sparsec.static, "set": sparsec.set_, "rigl": sparsec.rigl}


def load_text() -> tuple[torch.Tensor, torch.Tensor, int]:
    """The topics in key order as byte-valued characters; (train, validation, vocabulary size)."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    chars = sorted(set(text))
    codes = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(codes))
    return codes[:split], codes[split:], len(chars)


class CharTransformer(nn.Module):
    """Token + learned position embeddings, pre-norm causal blocks, a final norm and a dense head."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.embed(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, src_mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def block_weights(model: nn.Module) -> int:
    """Weights of the blocks' projections (what sparsify makes sparse), dense or kept."""
    total = 0
    for m in model.blocks.modules():
        if isinstance(m, sparsec.SparseLinear):
            total += m.layout.nnz
        elif isinstance(m, nn.Linear):
            total += m.weight.numel()
        elif isinstance(m, nn.MultiheadAttention):
            total += m.in_proj_weight.numel()
    return total


def build(method: str, args, vocab: int) -> nn.Module:
    torch.manual_seed(args.seed)
    if method == "small_dense":
        budget = block_weights(build("rigl", args, vocab))
        d = args.d_model

        def narrowed(d: int) -> nn.Module:
            return CharTransformer(vocab, d, args.layers, args.heads, args.context)

        while d > args.heads and block_weights(narrowed(d)) > budget:
            d -= args.heads  # narrower until the blocks fit RigL's kept weights
        torch.manual_seed(args.seed)
        return narrowed(d)
    model = CharTransformer(vocab, args.d_model, args.layers, args.heads, args.context)
    if method == "dense":
        return model
    return sparsec.sparsify(
        model, spec=f"{args.sparsity:.0%}", distribution="erk", policy=POLICIES[method], dense=["head"]
    )


def batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    """The same random windows, in the same order, for every method."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        window = torch.stack([data[s : s + context + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def validation_loss(model: nn.Module, data: torch.Tensor, context: int, limit: int | None = None) -> float:
    """Mean next-character loss (nats) over consecutive windows of the held-out text (``limit`` of them)."""
    model.eval()
    n = (len(data) - 1) // context
    starts = torch.arange(n)[: limit or n] * context
    total, count = 0.0, 0
    for chunk in starts.split(64):
        x = torch.stack([data[s : s + context] for s in chunk.tolist()])
        y = torch.stack([data[s + 1 : s + context + 1] for s in chunk.tolist()])
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def training_flops(model: nn.Module, args, updates: int, grows: bool) -> float:
    """The cost model's FLOPs of the run: every step's weight products (sparsec.step_flops), the causal
    attention products (QK^T and AV, forward and two backward, full T x T as SDPA computes them) and,
    for a gradient-driven policy, the dense |dY^T X| of each update step."""
    rows = args.batch * args.context
    step = sparsec.step_flops(model, rows)
    d = model.embed.embedding_dim
    attention = args.layers * 3 * 2 * 2 * args.batch * args.context * args.context * d
    return args.steps * (step["sparse"] + step["dense"] + attention) + (updates * step["grow"] if grows else 0.0)


def train(method: str, args, train_data, val_data, vocab: int) -> dict:
    model = build(method, args, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, args.steps) / args.steps))
    )
    updater = sparsec.MaskUpdater(model, opt, total_steps=args.steps) if method in POLICIES else None
    curve, moved, updates = [], 0, 0
    t0 = time.perf_counter()
    for t, (x, y) in enumerate(batches(train_data, args.steps, args.batch, args.context, args.seed), start=1):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if updater is not None:
            changed = updater.step()
            updates += bool(changed)
            moved += sum(changed.values())
        opt.zero_grad(set_to_none=True)
        if t % args.eval_every == 0 or t == args.steps:
            curve.append((t, validation_loss(model, val_data, args.context, limit=args.eval_windows)))
            print(f"  {method:<11} step {t:>5}  train {loss.item():.3f}  val {curve[-1][1]:.3f}", flush=True)
    seconds = time.perf_counter() - t0
    val = validation_loss(model, val_data, args.context)
    grows = method == "rigl"
    return {
        "method": method,
        "val_loss": val,
        "bpc": val / math.log(2),
        "curve": curve,
        "seconds": seconds,
        "weights": block_weights(model),
        "updates": updates,
        "moved": moved,
        "flops": training_flops(model, args, updates, grows),
        "d_model": model.embed.embedding_dim,
    }


def table(results: list[dict]) -> list[str]:
    dense = next((r for r in results if r["method"] == "dense"), results[0])
    lines = [
        "| method | d_model | block weights | val loss (nats) | bits/char | training FLOPs vs dense | "
        "mask updates (weights moved) | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['d_model']} | {r['weights']:,} | {r['val_loss']:.4f} | {r['bpc']:.4f} | "
            f"{r['flops'] / dense['flops']:.3f}x | {r['updates']} ({r['moved']:,}) | {r['seconds']:.0f} s |"
        )
    return lines


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, [v / math.log(2) for v in losses], label=f"{r['method']} ({r['bpc']:.3f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per character")
    ax.set_title("char LM on pydoc_data.topics (90% sparse, ERK)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per curve point")
    p.add_argument("--plot", type=Path, default=Path("bench/char_lm.png"))
    p.add_argument("--no-results", action="store_true", help="do not write bench/RESULTS.md")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    train_data, val_data, vocab = load_text()
    print(f"text: {len(train_data):,} training and {len(val_data):,} held-out characters, {vocab} symbols")
    t0 = time.perf_counter()
    results = [train(m, args, train_data, val_data, vocab) for m in methods]
    total = time.perf_counter() - t0
    lines = table(results)
    print("\n".join(lines))
    print(f"total {total:.0f} s")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.plot)
    if not args.no_results:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from results import machine, write_section  # bench/results.py: the shared RESULTS.md writer

        cmd = "python examples/char_lm.py " + " ".join(argv if argv is not None else sys.argv[1:])
        level = f"{args.sparsity:.0%}"
        head = [
            f"## Character LM: {', '.join(methods)} at {level} ERK",
            "",
            f"`{cmd.strip()}` on {machine()}, {time.strftime('%Y-%m-%d')}, {total / 60:.1f} min in all. "
            f"{args.layers} pre-norm blocks, d_model {args.d_model}, {args.heads} heads, context {args.context}, "
            f"batch {args.batch}, {args.steps} steps of AdamW (lr {args.lr}, warm-up then cosine), one seed; "
            "validation on the whole held-out last 10%. FLOPs: the cost model's weight products plus attention.",
            "",
        ]
        section = "char-lm" if args.sparsity == 0.9 else f"char-lm-{level[:-1]}"  # one section per sparsity
        write_section(section, "\n".join(head + lines + ["", f"Curves: [{args.plot.name}]({args.plot.name})"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
