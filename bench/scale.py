"""Scale: how large a model trains on this machine, dense against sparsec (static and RigL), side by side.

The model is the issue's MLP ``1024 -> H -> H -> 10`` (batch 64, SGD with momentum, fp32); its middle layer
holds H^2 dense-equivalent weights. H doubles from ``--start`` until the machine's memory (``--memory-gb``) or
the per-run time budget (``--budget-s``) stops each variant. Every run is its own process (its peak RSS is
its own, an out-of-memory end stops only that variant), and reports: dense-equivalent parameters, kept
weights, build time, ordinary step, update step (RigL: drop and grow at every ``--delta-t`` steps), the
index-plan rebuild an update pays, peak RSS and whether the loss fell (a fixed learnable task: labels of a
random linear teacher). Writes its table and a plot into bench/RESULTS.md and bench/scale.png.

    python bench/scale.py [--sparsity 0.99] [--start 4096] [--max-h 65536] [--headline | --headline-only]

``--headline`` adds one run at 99.9% sparsity with H = 131072 (17 billion dense-equivalent weights in the
middle layer) on the RigL variant only, with more steps and ``--headline-lr`` (the width makes the table's
learning rate diverge there), where the loss must fall; it has its own section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from results import machine, write_section

HERE = Path(__file__).parent
VARIANTS = ("dense", "static", "rigl")


def run_child(args: dict) -> dict:
    """One (variant, H) run in this process; returns its measurements. ``args["device"]`` (default ``cpu``):
    where the model trains; on a GPU every timing waits for the device (an update's host-side work counts)
    and ``gpu_peak_gb`` is added (bench/gpu_check.py runs it there, on the generated kernels). The plan
    rebuild on the cpp backend is the plans' rebuild from the buffers; on generated kernels, the write of
    the positions an update runs (encoded into the index buffers, the plans refreshed)."""
    import torch
    from torch import nn

    import sparsec
    from sparsec.runtime import ops, plans

    torch.manual_seed(0)
    h, variant, spec = args["h"], args["variant"], args["spec"]
    device = torch.device(args.get("device", "cpu"))
    cuda = device.type == "cuda"

    def now() -> float:  # wall clock once the device is done: a step's kernels and its host work
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    classes = args.get("classes", 10)  # 16 for block specs: their blocks must tile the last layer
    t0 = now()
    if variant == "dense":
        model = nn.Sequential(
            nn.Linear(1024, h, device=device), nn.ReLU(), nn.Linear(h, h, device=device), nn.ReLU(),
            nn.Linear(h, 10, device=device),
        )  # fmt: skip
    else:
        policy = sparsec.static if variant == "static" else sparsec.rigl(delta_t=args["delta_t"])

        def layer(i, o):  # init "sparse": each output rescaled for its kept fan-in (at 99.9% about 1 of 1024)
            return sparsec.SparseLinear(i, o, spec=spec, policy=policy, init="sparse", device=device)

        model = nn.Sequential(layer(1024, h), nn.ReLU(), layer(h, h), nn.ReLU(), layer(h, classes))
    build = now() - t0
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # imports included
    kept = sum(m.layout.nnz for m in model.modules() if isinstance(m, sparsec.SparseLinear))
    opt = torch.optim.SGD(model.parameters(), lr=args["lr"], momentum=0.9)
    updater = sparsec.MaskUpdater(model, opt, total_steps=10 * args["steps"]) if variant == "rigl" else None
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(1024, classes, generator=gen)
    batches = []
    for _ in range(4):
        x = torch.randn(64, 1024, generator=gen)
        batches.append((x.to(device), (x @ teacher).argmax(1).to(device)))
    ordinary, update, losses = [], [], []
    deadline = time.perf_counter() + args["budget_s"]
    for step in range(args["steps"]):
        x, y = batches[step % len(batches)]
        t = now()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        changed = updater.step() if updater is not None else {}
        opt.zero_grad()
        took = now() - t
        (update if changed else ordinary).append(took)
        losses.append(loss.item())
        if time.perf_counter() > deadline:
            break
    rebuild = None
    if variant != "dense":  # what an update pays to rebuild the plans the kernels read
        for m in model.modules():  # the positions an update hands the rebuild (cached: not timed)
            if isinstance(m, sparsec.SparseLinear):
                m.positions()
        rebuilds = []
        for _ in range(5):  # the median of five: one rebuild is a few milliseconds on a noisy machine
            t = now()
            for m in model.modules():
                if not isinstance(m, sparsec.SparseLinear):
                    continue
                index = list(m.index_buffers().values())
                if ops.backend_for(m.values) != "cpp":  # generated kernels: what an update's write of the
                    m.write_positions(m.positions())  # positions runs (encode into the buffers, plans refreshed)
                    continue
                held = plans.held_plan(index, "cpp")  # rebuilt into, as an update's refresh does
                key = ops._key(m.values, *m.layout.op_key)
                rebuilt = plans._build_plan(key, "cpp", index, m.positions(), into=held)
                if rebuilt.offsets_t is not None:  # its dy @ W walks W^T: rebuilt at its next use, counted
                    rebuilt.transposed()
            rebuilds.append(now() - t)
        rebuild = sorted(rebuilds)[2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the dense layers below
    extra = {"gpu_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30} if cuda else {}  # the same
    budget = None  # the budget: an update at most an ordinary step + 1.5 dense forwards of the layers
    if variant == "rigl" and update and ordinary and h <= 16384:  # the dense layers fit beside the model
        with torch.no_grad():
            dense = [
                nn.Linear(1024, h, device=device),
                nn.Linear(h, h, device=device),
                nn.Linear(h, classes, device=device),
            ]
            acts = [batches[0][0], torch.randn(64, h, device=device), torch.randn(64, h, device=device)]
            forwards = []
            for _ in range(3 + 2 * cuda):  # on a GPU the first calls load cuBLAS's kernels
                t = now()
                for layer, a in zip(dense, acts, strict=True):
                    layer(a)
                forwards.append(now() - t)
        mid = sorted(ordinary)[len(ordinary) // 2]
        budget = sorted(update)[len(update) // 2] / (mid + 1.5 * min(forwards))
    quarter = max(1, len(losses) // 4)
    return {
        **extra,
        "h": h,
        "variant": variant,
        "spec": spec if variant != "dense" else "dense",
        "dense_params": 1024 * h + h * h + h * 10,
        "kept": kept if variant != "dense" else 1024 * h + h * h + h * 10,
        "build_s": build,
        "ordinary_s": sorted(ordinary[1:] or ordinary)[len(ordinary[1:] or ordinary) // 2] if ordinary else None,
        "update_s": sorted(update)[len(update) // 2] if update else None,
        "updates": len(update),
        "rebuild_s": rebuild,
        "steps": len(losses),
        "loss_first": sum(losses[:quarter]) / quarter,
        "loss_last": sum(losses[-quarter:]) / quarter,
        "peak_rss_gb": peak,
        "build_peak_gb": build_peak,
        "update_over_budget": budget,
    }


def dense_bytes(h: int) -> int:
    """What the dense model's training holds at least: weights, gradients and momentum in fp32."""
    return 3 * 4 * (1024 * h + h * h + 10 * h)


def launch(args: dict, timeout: float, env: dict[str, str] | None = None) -> dict:
    """``run_child(args)`` in a process of its own (its peak RSS its own; ``env`` added to this one's)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {**args, "failed": f"past the {timeout:.0f} s budget"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1][:120]
        return {**args, "failed": "killed (out of memory?)" if done.returncode < 0 else last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.1f} s"


def table(rows: list[dict]) -> str:
    lines = [
        "| H | variant | dense-equivalent weights | kept | build | ordinary step | update step | plan rebuild "
        "| update / budget | peak RSS after build | peak RSS | loss first -> last quarter |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.get("update_over_budget")
        budget = "-" if ratio is None else f"{ratio:.2f}"
        if "failed" in r:
            lines.append(f"| {r['h']} | {r['variant']} | {1024 * r['h'] + r['h'] ** 2 + 10 * r['h']:.3g} | | "
                         f"{r['failed']} | | | | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {r['h']} | {r['variant']} {r['spec'] if r['variant'] != 'dense' else ''} | {r['dense_params']:.3g} "
            f"| {r['kept']:.3g} | {fmt_s(r['build_s'])} | {fmt_s(r['ordinary_s'])} | {fmt_s(r['update_s'])} "
            f"| {fmt_s(r['rebuild_s'])} | {budget} | {r['build_peak_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB "
            f"| {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_step) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in VARIANTS:
        ok = [r for r in rows if r["variant"] == variant and "failed" not in r]
        if not ok:
            continue
        n = [r["dense_params"] for r in ok]
        ax_mem.plot(n, [r["peak_rss_gb"] for r in ok], "o-", label=variant)
        ax_step.plot(n, [r["ordinary_s"] for r in ok], "o-", label=f"{variant}: ordinary step")
        if variant == "rigl":
            ax_step.plot(n, [r["update_s"] for r in ok], "s--", label="rigl: update step")
    for ax, what in ((ax_mem, "peak RSS (GB)"), (ax_step, "seconds")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dense-equivalent weights")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    fig.suptitle("MLP 1024-H-H-10, batch 64, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_SCAN_TEXT = (
    "Batch 64, fp32, random kept positions, 30% of them just dropped (RigL's first update). The fused scan computes "
    "|dY^T X| a register tile at a time and keeps the update's regrowth (the best fresh or just-dropped positions) "
    "as each tile leaves the registers; torch.mm computes and stores the product and selects nothing. Median of "
    "five, alternating, in one process."
)


def scan_against_product(sparsity: float) -> str:
    """The grow step's share of an update, measured on its own: the fused C++ scan (``|dY^T X|`` and the
    selection of the update's regrowth, never stored) against ``torch.mm`` computing the product alone, on
    the MLP's layers at batch 64, side by side in this process (median of five, alternating)."""
    import torch

    from sparsec.formats.sampling import random_subsets
    from sparsec.runtime.cpp import cpp_grow_layer_wide

    gen = torch.Generator().manual_seed(0)
    lines = ["| layer (out x in) | kept | regrown | fused scan | torch.mm (product only) | scan / product |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for out, inn in ((4096, 1024), (4096, 4096), (8192, 8192), (16384, 1024), (16384, 16384)):
        dy, x = torch.randn(64, out, generator=gen), torch.randn(64, inn, generator=gen)
        n = out * inn
        kept = random_subsets(1, n, n - int(sparsity * n), gen)  # O(kept): no tensor of every position
        k = int(0.3 * kept.numel())  # RigL's first drop fraction
        stays = torch.ones(kept.numel(), dtype=torch.bool)
        stays[torch.randperm(kept.numel(), generator=gen)[:k]] = False
        scan, mm = [], []
        for _ in range(5):
            t = time.perf_counter()
            cpp_grow_layer_wide(dy, x, kept, k, stays)
            scan.append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.mm(dy.t(), x)
            mm.append(time.perf_counter() - t)
        a, b = sorted(scan)[2], sorted(mm)[2]
        lines.append(f"| {out} x {inn} | {kept.numel():.3g} | {k:.3g} | {fmt_s(a)} | {fmt_s(b)} | {a / b:.2f} |")
    return "\n".join(lines)


STRUCTURES = ("fanin(99%)", "2:4", "block(16x16, 99%)")


def structures(args: argparse.Namespace) -> None:
    """RigL on the MLP with each structured spec, at H = 4096 and 8192: the update step against its budget
    (the grow step of units no wider than a row, fan-in rows and N:M groups, and of blocks)."""
    rows = []
    for h in (4096, 8192):
        for spec in STRUCTURES:
            classes = 16 if spec.startswith("block") else 10
            child = {"h": h, "variant": "rigl", "spec": spec, "steps": args.steps, "delta_t": args.delta_t,
                     "lr": args.lr, "budget_s": args.budget_s, "classes": classes}  # fmt: skip
            rows.append(launch(child, timeout=2 * args.budget_s + 120))
            print(table([rows[-1]]).splitlines()[-1], flush=True)
    write_section(
        "scale-structures",
        f"## Scale: RigL's update step on structured specs (CPU)\n\nMeasured {datetime.date.today().isoformat()} "
        f"on {machine()}. Command: `python bench/scale.py --structures --steps {args.steps} --delta-t "
        f"{args.delta_t} --lr {args.lr}`. The MLP 1024-H-H-10 (16 outputs for block specs), as the Scale table; "
        "fan-in rows grow on the fused per-row scan (a heap per row as the product leaves the registers), N:M "
        "groups a chunk of rows at a time on the generated per-row kernel, blocks on the chunked layer-wide "
        "selection. Ordinary steps with delta_t = 2 are arming steps (the "
        "drop decided from the weights).\n\n" + table(rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--max-h", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--delta-t", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--budget-s", type=float, default=300.0, help="time budget of one run")
    parser.add_argument("--memory-gb", type=float, default=None, help="default: 80%% of this machine's memory")
    parser.add_argument("--headline", action="store_true")
    parser.add_argument("--headline-only", action="store_true", help="the headline run alone")
    parser.add_argument("--headline-lr", type=float, default=0.02)
    parser.add_argument("--scan-only", action="store_true", help="the grow scan against the product alone")
    parser.add_argument(
        "--structures", action="store_true", help="RigL's update / budget for fan-in, N:M and block specs alone"
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    if args.structures:
        structures(args)
        return
    if not args.scan_only and not args.headline_only:  # in its own process: a child's peak RSS counts its parent's
        subprocess.run([sys.executable, __file__, "--scan-only", "--sparsity", str(args.sparsity)], check=True)
    if args.scan_only:
        table_text = scan_against_product(args.sparsity)
        print(table_text, flush=True)
        write_section(
            "scale-scan",
            f"## Scale: the grow step's fused scan against the product alone (CPU)\n\nMeasured "
            f"{datetime.date.today().isoformat()} on {machine()}. Command: `python bench/scale.py --sparsity "
            f"{args.sparsity} --scan-only` (also part of every run without --headline-only). {_SCAN_TEXT}\n\n"
            f"{table_text}",
        )
        return
    memory = (args.memory_gb or 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30) * 2**30
    spec = f"{args.sparsity * 100:g}%"
    rows, stopped = [], set()
    h = args.start
    while not args.headline_only and h <= args.max_h and len(stopped) < len(VARIANTS):
        for variant in VARIANTS:
            if variant in stopped:
                continue
            if variant == "dense" and dense_bytes(h) > memory:
                rows.append(
                    {"h": h, "variant": variant, "failed": f"needs {dense_bytes(h) / 2**30:.0f} GB: does not fit"}
                )
                stopped.add(variant)
                continue
            child = {"h": h, "variant": variant, "spec": spec, "steps": args.steps, "delta_t": args.delta_t,
                     "lr": args.lr, "budget_s": args.budget_s}  # fmt: skip
            result = launch(child, timeout=2 * args.budget_s + 120)
            rows.append(result)
            print(table([result]).splitlines()[-1], flush=True)
            if "failed" in result:
                stopped.add(variant)
        h *= 2
    today = datetime.date.today().isoformat()
    if args.headline or args.headline_only:
        child = {"h": 131072, "variant": "rigl", "spec": "99.9%", "steps": 24, "delta_t": 4,
                 "lr": args.headline_lr, "budget_s": 1800.0}  # fmt: skip
        headline = launch(child, timeout=3600)
        print(table([headline]).splitlines()[-1], flush=True)
        write_section(
            "scale-headline",
            "\n".join([
                "## Scale headline: 17 billion dense-equivalent weights at 99.9%, RigL, on 2 cores",
                "",
                f"Measured {today} on {machine()}. Command: `python bench/scale.py {' '.join(sys.argv[1:])}` "
                f"(headline learning rate {args.headline_lr}). The MLP 1024-131072-131072-10 (middle layer 1.7e10 "
                "dense-equivalent weights),",
                "99.9% unstructured, RigL every 4 steps for 24 steps, batch 64, SGD momentum 0.9, init='sparse'.",
                "",
                table([headline]),
            ]),
        )  # fmt: skip
    if args.headline_only:
        print("wrote bench/RESULTS.md")
        return
    plot(rows, HERE / "scale.png")
    body = [
        "## Scale: dense against sparsec, the MLP 1024-H-H-10 (CPU)",
        "",
        f"Measured {today} on {machine()}. Command: `python bench/scale.py --sparsity {args.sparsity} --start "
        f"{args.start} --max-h {args.max_h} --steps {args.steps} --delta-t {args.delta_t} --lr {args.lr}"
        f"{' --headline' if args.headline else ''}`. Batch 64, SGD momentum 0.9, fp32; each run its own process;",
        "sparse layers start from init='sparse' (each output rescaled for its kept fan-in).",
        "Ordinary and update steps are medians of the run's steps (RigL drops and grows every delta_t steps); the",
        "update / budget is the update step over (ordinary step + 1.5 dense forwards of the same layers at the",
        "batch, nn.Linear, same process; H <= 16384): the issue's target is at most 1.",
        "The plan rebuild is what an update pays to rebuild the cpp index plans of every sparse layer (from their",
        "compressed rows, into the plans held; W^T too where a layer's dy @ W walks it); peak RSS is the process's,",
        "imports included: after the build, and",
        "over the whole run (torch alone: 0.22 GB, sparsec 0.01 GB more; the first optimizer imports torch._dynamo,",
        "so any training process here peaks at 0.37 GB or more before its model). Dense stops where its weights,",
        "gradients and momentum no longer fit 80% of the machine's memory.",
        "",
        table(rows),
        "",
        "![scale](scale.png)",
    ]
    write_section("scale", "\n".join(body))
    print("wrote bench/RESULTS.md and bench/scale.png")


if __name__ == "__main__":
    sys.exit(main())
