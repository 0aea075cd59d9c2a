"""The CPU backends side by side: nn.Linear, the cpu backend (PyTorch CSR) and the cpp backend (generated
C++ kernels), forward and forward+backward, ratios against dense measured in one run. Writes bench/RESULTS.md.

    python bench/bench_backends.py [--min-run-time 0.5]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from results import machine, write_section
from torch import nn
from torch.utils.benchmark import Timer

import sparsec
from sparsec import config
from sparsec.codegen import cpp
from sparsec.codegen.render import render

# (out, in, spec, batch): the rows of issue 13's table, then one of each structure at 4096^2
CASES = [
    (3072, 768, "98%", 256),
    (3072, 768, "90%", 256),
    (768, 3072, "fanin(90%)", 1),
    (4096, 4096, "90%", 256),
    (4096, 4096, "99%", 256),
    (4096, 4096, "2:4", 256),
    (4096, 4096, "block(32x32, 90%)", 256),
    (4096, 4096, "fanin(90%)", 256),
]
BACKENDS = ("cpu", "cpp")


def median_ms(fn, min_run_time: float) -> float:
    fn()  # warm: plans, compiled objects
    # Timer runs at one thread unless told: every column at the process's own count
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def timings(module: nn.Module, x: torch.Tensor, min_run_time: float) -> tuple[float, float]:
    def forward():
        with torch.no_grad():
            module(x)

    def step():
        module(x).sum().backward()

    return median_ms(forward, min_run_time), median_ms(step, min_run_time)


def compile_latency() -> tuple[float, float]:
    """Seconds to build the fp32 kernels into an empty cache, and to load the cached object afresh
    (a copy under a new name, so the dynamic loader really opens it)."""
    source = render("cpu/rows.cpp.jinja", scalar="float", index="int32_t")
    with tempfile.TemporaryDirectory() as tmp, config.patch(cache_dir=tmp):
        t0 = time.perf_counter()
        path = cpp.build(source)
        cold = time.perf_counter() - t0
        copy = Path(tmp) / "copy.so"
        shutil.copy(path, copy)
        t0 = time.perf_counter()
        cpp.object_path(source).exists()  # what a warm lookup does before loading
        ctypes.CDLL(str(copy))
        warm = time.perf_counter() - t0
    return cold, warm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (torch.utils.benchmark)")
    args = parser.parse_args(argv)
    cold, warm = compile_latency()
    print(f"cold compile {cold:.2f} s, warm load {warm * 1e3:.1f} ms", flush=True)
    rows = []
    for out, inn, spec, batch in CASES:
        torch.manual_seed(0)
        x = torch.randn(batch, inn, requires_grad=True)
        dense = nn.Linear(inn, out, bias=False)
        layer = sparsec.SparseLinear(inn, out, bias=False, spec=spec, policy=sparsec.static)
        d_fwd, d_step = timings(dense, x, args.min_run_time)
        cells = [f"{out}x{inn} `{spec}` batch {batch}", f"{d_fwd:.2f} / {d_step:.2f}"]
        for backend in BACKENDS:
            with config.patch(backend=backend):
                fwd, step = timings(layer, x, args.min_run_time)
            cells.append(f"{d_fwd / fwd:.2f}x, {d_step / step:.2f}x")
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    cmd = "python bench/bench_backends.py" + (f" --min-run-time {args.min_run_time}" if argv or sys.argv[1:] else "")
    body = "\n".join(
        [
            "## CPU backends: PyTorch CSR (cpu) and generated C++ (cpp) against nn.Linear",
            "",
            f"Measured {datetime.date.today().isoformat()} on {machine()}. Command: `{cmd}` (fp32, no bias, "
            f"{torch.get_num_threads()} threads in every column, medians of `torch.utils.benchmark`; forward "
            "under no_grad, forward+backward of `sum()`).",
            "",
            "| layer | dense fwd / fwd+bwd ms | cpu vs dense (fwd, fwd+bwd) | cpp vs dense (fwd, fwd+bwd) |",
            "|---|---|---|---|",
            *rows,
            "",
            "Ratios are dense time / sparse time in the same run (above 1: faster than dense).",
            f"Compile latency of the cpp kernels (one object per dtype serves every shape and structure): cold "
            f"build {cold:.2f} s ({cpp.compiler()}, {' '.join(cpp.FLAGS)}), warm load {warm * 1e3:.1f} ms.",
        ]
    )
    write_section("cpu-backends", body)
    print("wrote bench/RESULTS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
