"""Cost of IR + passes + code generation per layer: cold, and a warm cache hit. Writes bench/RESULTS.md.

    python bench/bench_codegen.py

cold: build the four programs, run the pipeline on three of them, render three kernels, write them
to an empty cache directory and import them. warm: the same request for a layer already compiled in
this process (the in-memory lookups a training step makes).
"""

from __future__ import annotations

import datetime
import statistics
import tempfile
import time

from results import machine, write_section

from sparsec import config
from sparsec.codegen.cache import load_kernel_module
from sparsec.runtime.compile import compile_layer

LAYERS = [
    ("2:4", 4096, 4096),
    ("90%", 1024, 4096),
    ("block(32x32, 90%)", 4096, 1024),
    ("fanin(90%)", 768, 3072),
    ("1:8", 2048, 2048),
]


def request(spec, inn, out):
    layer = compile_layer(spec, inn, out, "fp16", True, "relu")
    return [load_kernel_module(k.source) for k in layer.kernels.values()]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, config.patch(cache_dir=tmp):
        for spec, out, inn in LAYERS:
            t0 = time.perf_counter()
            request(spec, inn, out)
            cold = (time.perf_counter() - t0) * 1e3
            warm_runs = []
            for _ in range(200):
                t0 = time.perf_counter()
                request(spec, inn, out)
                warm_runs.append((time.perf_counter() - t0) * 1e3)
            warm = statistics.median(warm_runs)
            rows.append(f"| `{spec}` | {out}x{inn} | {cold:.1f} | {warm:.4f} |")
            print(rows[-1])
    body = "\n".join(
        [
            "## IR, passes and code generation per layer",
            "",
            f"Measured {datetime.date.today().isoformat()} on {machine()} with `python bench/bench_codegen.py`",
            "(fp16, bias and ReLU; four kernels per layer: forward, grad_input, grad_values, grow_scores).",
            "",
            "| spec | weight | cold IR + passes + codegen + import, ms | warm cache hit, ms (median of 200) |",
            "|---|---|---|---|",
            *rows,
            "",
            "Targets: warm under 1 ms per layer, cold under 100 ms. The first cold layer also pays for importing",
            "Triton's frontend and Jinja; Triton's own compilation to a GPU binary is not included (no GPU here).",
        ]
    )
    write_section("codegen", body)


if __name__ == "__main__":
    main()
