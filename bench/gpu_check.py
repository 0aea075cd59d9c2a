"""What a person with one GPU runs to check sparsec on it, in under 8 minutes.

1. tests/gpu (every generated kernel against float64 at fp32/tf32/fp16/bf16, fp16 and bf16 RigL
   training with updates on every structure, autocast, a second device, CUDA graphs after an update);
2. forward and forward+backward of every structure against cuBLAS dense (``torch.nn.functional.linear``
   on the dense weight) at one realistic shape: a 4096 x 4096 layer, 8192 tokens, fp16, timed side by
   side with CUDA events in one process;
3. the GPU, the software, the date, the tests' outcome and the table into bench/RESULTS.md.

    python bench/gpu_check.py [--size 4096] [--tokens 8192] [--skip-tests]

``--dry-run`` runs the timing code on the CPU (Triton's interpreter, a tiny layer, wall-clock timing) and
writes nothing: tests/unit/test_gpu_scripts.py keeps the script working where no GPU is.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from results import write_section

import sparsec
from sparsec import config

SPECS = ["90%", "95%", "2:4", "block(32x32, 90%)", "fanin(90%)"]
ROOT = Path(__file__).resolve().parent.parent


def cuda_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median of ``reps`` timings with CUDA events, after ``warmup`` calls (compiles and plans)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_tests() -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "tests/gpu"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    return f"{summary} (exit {done.returncode})", time.time() - t0


def wall_ms(fn, warmup: int = 1, reps: int = 3) -> float:
    """The dry run's timer: wall-clock median (the interpreter on a CPU; its figures mean nothing)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def time_layers(size: int, tokens: int, dry_run: bool = False) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    device, backend, timer = ("cpu", "interpret", wall_ms) if dry_run else ("cuda", "triton", cuda_ms)
    x = torch.randn(tokens, size, device=device, dtype=torch.float16, requires_grad=True)
    dy = torch.randn(tokens, size, device=device, dtype=torch.float16)
    rows = []
    with config.patch(backend=backend):
        for spec in ["dense", *SPECS]:
            if spec == "dense":
                layer = torch.nn.Linear(size, size, device=device, dtype=torch.float16)
            else:
                layer = sparsec.SparseLinear(size, size, spec=spec, device=device, dtype=torch.float16)

            def forward(layer=layer):
                with torch.no_grad():
                    layer(x)

            def forward_backward(layer=layer):
                layer(x).backward(dy)

            rows.append((spec, timer(forward), timer(forward_backward)))
            print(f"{spec:<20} forward {rows[-1][1]:8.3f} ms   forward+backward {rows[-1][2]:8.3f} ms", flush=True)
            del layer
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="in = out features")
    parser.add_argument("--tokens", type=int, default=8192, help="batch rows (tokens)")
    parser.add_argument("--skip-tests", action="store_true", help="time only (tests/gpu already ran)")
    parser.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny layer, writes nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        time_layers(64, 32, dry_run=True)
        return 0
    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run")
        return 2
    import triton  # only here: the GPU run reports the Triton it compiled with

    t0 = time.time()
    tests, test_s = ("skipped (--skip-tests)", 0.0) if args.skip_tests else run_tests()
    rows = time_layers(args.size, args.tokens)
    dense_f, dense_fb = rows[0][1], rows[0][2]
    gpu = torch.cuda.get_device_name()
    lines = [
        "## GPU check: tests/gpu and every structure against cuBLAS",
        "",
        f"`python bench/gpu_check.py --size {args.size} --tokens {args.tokens}` on {gpu} "
        f"({torch.cuda.device_count()} visible), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"triton {triton.__version__}, {datetime.date.today().isoformat()}; {time.time() - t0:.0f} s in all.",
        "",
        f"tests/gpu: {tests} in {test_s:.0f} s.",
        "",
        f"Layer {args.size} x {args.size}, {args.tokens} tokens, fp16, generated kernels (triton backend); "
        "dense = nn.Linear (cuBLAS). Median of 10 after 3 warm-up calls, CUDA events, side by side in one run; "
        "speed-up = dense time / sparse time.",
        "",
        "| spec | forward ms | forward speed-up | forward+backward ms | forward+backward speed-up |",
        "|---|---|---|---|---|",
    ]
    for spec, f, fb in rows:
        lines.append(f"| `{spec}` | {f:.3f} | {dense_f / f:.2f}x | {fb:.3f} | {dense_fb / fb:.2f}x |")
    write_section("gpu-check", "\n".join(lines))
    print(f"wrote bench/RESULTS.md ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
