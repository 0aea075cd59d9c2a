"""CPU path benchmark: sparse layers against nn.Linear, side by side in one run.

For each spec: forward+backward time of SparseLinear and of the dense nn.Linear of the same shape,
the bytes the weights hold (values + index buffers against the dense weight), and the grow step:
the extra time and peak extra memory of an armed backward (RigL candidate collection) against the
size of the dense gradient it never builds. Writes the table into bench/RESULTS.md.

    python bench/bench_cpu_layers.py [--out 4096] [--in 4096] [--batch 256] [--backend cpp|cpu]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
from results import machine, write_section
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer

import sparsec

SPECS = ["90%", "95%", "99%", "2:4", "block(32x32, 90%)", "fanin(90%)"]


def median_ms(fn) -> float:
    return (
        Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        .blocked_autorange(min_run_time=1.0)
        .median
        * 1e3
    )


def peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def held_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def bench(out: int, inn: int, batch: int) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(batch, inn, requires_grad=True)
    dense = nn.Linear(inn, out, bias=False)

    def dense_step():
        dense(x).sum().backward()

    t_dense = median_ms(dense_step)
    dense_bytes = held_bytes(dense)
    rows = []
    for spec in SPECS:
        layer = sparsec.SparseLinear(inn, out, bias=False, spec=spec, policy=sparsec.rigl(delta_t=1))

        def step(layer=layer):
            layer(x).sum().backward()

        step()  # builds the cached plan (and compiles the kernels)
        t_sparse = median_ms(step)
        plain_peak = peak_bytes(step)
        sparsec.MaskUpdater(layer, None, total_steps=10**6)  # arms the layer for a grow step
        capture = layer.grow_capture

        def armed_step(layer=layer, capture=capture):
            layer.grow_capture = capture
            step()

        t_armed = median_ms(armed_step)
        armed_peak = peak_bytes(armed_step)
        rows.append(
            f"| `{spec}` | {layer.layout.nnz / (out * inn):.1%} | {t_dense:.1f} | {t_sparse:.1f} | "
            f"{t_dense / t_sparse:.2f}x | {held_bytes(layer) / dense_bytes:.3f} | {t_armed:.1f} | "
            f"{max(0, armed_peak - plain_peak) / 2**20:.1f} | {out * inn * 4 / 2**20:.0f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--in", dest="inn", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backend", choices=["cpu", "cpp"], default="cpp", help="the CPU backend to measure")
    args = parser.parse_args()
    with sparsec.config.patch(backend=args.backend):
        rows = bench(args.out, args.inn, args.batch)
    budget = sparsec.config.grow_chunk_bytes
    body = "\n".join(
        [
            "## CPU path: sparse layers against nn.Linear",
            "",
            f"Measured {datetime.date.today().isoformat()} on {machine()}.",
            f"Command: `python bench/bench_cpu_layers.py --out {args.out} --in {args.inn} --batch {args.batch} "
            f"--backend {args.backend}` "
            f"(fp32, no bias, forward + backward of `sum()`, median of `torch.utils.benchmark`; "
            f"grow chunk budget {budget / 2**20:.0f} MiB).",
            "",
            "| spec | density | dense fwd+bwd ms | sparse fwd+bwd ms | speed-up | weight bytes vs dense | "
            "armed (grow) fwd+bwd ms | grow extra peak MiB | dense gradient MiB (never built) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Speed-up is dense time / sparse time in the same run. Weight bytes count values and index buffers.",
            "The armed step computes `|dY^T X|` chunk by chunk: the FLOPs of a dense weight gradient (RigL needs",
            "them) but not its memory. Grow extra peak is how far the armed backward's peak rises above the plain",
            "backward's; 0 means the selection fit under the backward's own peak.",
            {
                "cpu": "The cpu backend: PyTorch's CSR kernels (`torch.sparse.mm`, `sampled_addmm`), every structure.",
                "cpp": "The cpp backend: sparsec's generated C++ kernels (rows for unstructured, N:M and fan-in; "
                "micro-tiles for blocks).",
            }[args.backend],
        ]
    )
    write_section("cpu-layers", body)
    print("wrote bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
