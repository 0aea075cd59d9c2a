"""Where a batch-1 fan-in forward's time goes, and the gather designs tried for it (issue 13's 4x target).

    python bench/probe_gather_designs.py

On the benchmark's 3072 -> 768 fanin(90%) layer, side by side in one process:
- the 2-thread budget: nn.Linear, the sparse layer as a user calls it, and the shipped kernel alone (one
  ctypes call with its arguments bound: what no Python wrapper can go below);
- one thread, the same rows: the shipped gather design against the other designs tried
  (bench/gather_designs.cpp), each checked against a float64 product first.
Writes the "batch1-budget" section of bench/RESULTS.md.
"""

from __future__ import annotations

import ctypes
import datetime
import time
from pathlib import Path

import torch
from results import machine, write_section
from torch import nn

import sparsec
from sparsec import config
from sparsec.codegen.cpp import load
from sparsec.runtime import cpp, ops

DESIGNS = [
    "four 16-bit indices per 64-bit load, 4-lane FMAs (shipped)",
    "a 16-bit load per index, eight scalar chains",
    "AVX2 vgatherdps, 8 lanes",
    "AVX-512 vgatherdps, 16 lanes",
]
OUT, IN, SPEC = 768, 3072, "fanin(90%)"


def best_us(fn, n: int = 2000, repeats: int = 9) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(IN, OUT, bias=False, spec=SPEC, policy=sparsec.static)
    dense = nn.Linear(IN, OUT, bias=False)
    x = torch.randn(1, IN)
    lines = []
    with config.patch(backend="cpp"), torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        expect = x.double() @ layer.dense_weight().double().t()
        torch.testing.assert_close(layer(x).double(), expect, rtol=1e-4, atol=1e-4)
        index = [getattr(layer, name) for name in layer.layout.index_names]
        plan = ops.index_plan(ops._key(layer.values, *layer.layout.op_key), "cpp", index)
        assert plan.cols.dtype == torch.uint16, "the probe's designs read 16-bit columns"
        values = layer.values.detach().reshape(-1)
        values = values if plan.order is None else values[plan.order.long()].contiguous()  # entry order
        kernel = cpp._library("float", "float", "uint16_t", cpp._slot_type(plan.order)).sparsec_rows_spmm
        out = torch.empty(1, OUT)
        args = (x.data_ptr(), values.data_ptr(), plan.offsets.data_ptr(), plan.cols.data_ptr())
        threads = torch.get_num_threads()

        def kernel_alone():
            kernel(*args, None, None, out.data_ptr(), None, None, None, 1, OUT, IN, threads)

        kernel_alone()
        torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-4)
        t = {"dense": [], "layer": [], "kernel": []}
        for _ in range(3):  # interleaved: the machine's noise moves all three together
            t["dense"].append(best_us(lambda: dense(x)))
            t["layer"].append(best_us(lambda: layer(x)))
            t["kernel"].append(best_us(kernel_alone))
        d, s, k = (min(v) for v in t.values())
        lines += [
            f"2-thread budget ({threads} threads; best of interleaved timings): nn.Linear {d:.1f} us; the sparse "
            f"layer {s:.1f} us ({d / s:.2f}x dense); the shipped kernel alone, one ctypes call with its arguments "
            f"bound, {k:.1f} us ({d / k:.2f}x dense). The layer's Python (module call, input and mode checks, "
            f"plan lookup, ctypes) is the other {s - k:.1f} us; 4x dense needs the whole call under {d / 4:.1f} us.",
            "",
        ]

        probe = load((Path(__file__).parent / "gather_designs.cpp").read_text())
        probe.probe_time.restype = ctypes.c_double
        probe.probe_time.argtypes = (
            [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        )
        rows = torch.empty(OUT)
        entries = plan.offsets[-1].item()
        lines += [
            f"One thread, the same {OUT} rows ({entries} entries), each design checked against float64 first:",
            "",
            "| design | us per pass | entries per ns | vs shipped |",
            "|---|---|---|---|",
        ]
        times = []
        for i in range(probe.probe_designs()):
            ptrs = (values.data_ptr(), plan.cols.data_ptr(), plan.offsets.data_ptr(), x.data_ptr(), rows.data_ptr())
            probe.probe_time(i, *ptrs, OUT, 1, 1)
            torch.testing.assert_close(rows.double(), expect[0], rtol=1e-4, atol=1e-4)
            times.append(probe.probe_time(i, *ptrs, OUT, 200, 15) * 1e6)
        for name, us in zip(DESIGNS, times, strict=False):
            lines.append(f"| {name} | {us:.1f} | {entries / us / 1e3:.2f} | {times[0] / us:.2f}x |")
    body = "\n".join(
        [
            "## Batch-1 fan-in forward: where the time goes",
            "",
            f"Measured {datetime.date.today().isoformat()} on {machine()}. Command: "
            f"`python bench/probe_gather_designs.py`. Layer: {IN} -> {OUT} {SPEC}, batch 1, fp32.",
            "",
            *lines,
        ]
    )
    write_section("batch1-budget", body)
    print(body)


if __name__ == "__main__":
    main()
