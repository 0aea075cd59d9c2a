"""The cost model against measured time, where it can be measured: the CPU path, product by product.

For every structure, the CPU backend's three training products (forward ``Y = X W^T``, ``dX = dY W``,
``dW`` at the stored positions) and the dense products of the same shape are timed side by side in
one run, and predicted by ``passes.cost`` (``cpu_path_formulas`` for the CSR gathers the CPU path
runs, the dense formulas for ``torch.mm``) on this machine's own peaks, measured first: fp32 GEMM
FLOP/s and copy bandwidth. The ratio measured / predicted says how far the model is off, per product.
Writes the table into bench/RESULTS.md.

    python bench/cost_calibration.py [--size 2048] [--batch 256]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
from results import machine, write_section
from torch.utils.benchmark import Timer

import sparsec
from sparsec import config
from sparsec.ir.ops import Op
from sparsec.passes.cost import Peak, cpu_path_formulas, roofline
from sparsec.runtime import ops

SPECS = ["90%", "99%", "2:4", "block(32x32, 90%)", "fanin(90%)"]
PRODUCTS = [("forward", Op.SPMM), ("grad_input", Op.SPMM_T), ("grad_values", Op.SDDMM)]


def median_s(fn) -> float:
    return (
        Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        .blocked_autorange(min_run_time=0.5)
        .median
    )


def measure_peaks(n: int = 2048) -> Peak:
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2 * n**3 / median_s(lambda: a @ b)
    src = torch.randn(64 * 2**20 // 4)  # 64 MiB: far beyond the last-level cache
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / median_s(lambda: dst.copy_(src))  # read + write
    return Peak("this CPU", flops, flops, bandwidth)


def sparse_products(layer, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """The layer's three custom ops, as the CPU backend runs them in training."""
    key, index, values = layer.layout.op_key, list(layer.index_buffers().values()), layer.values.detach()
    return {
        "forward": lambda: ops.spmm(x, values, None, index, *key),
        "grad_input": lambda: ops.spmm_grad_input(dy, values, index, *key),
        "grad_values": lambda: ops.spmm_grad_values(dy, x, values, index, *key),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="out = in features")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    n, batch = args.size, args.batch
    torch.manual_seed(0)
    peak = measure_peaks()
    print(f"peaks: {peak.tensor_flops / 1e9:.1f} GFLOP/s fp32 GEMM, {peak.bandwidth / 1e9:.1f} GB/s copy", flush=True)
    x, dy = torch.randn(batch, n), torch.randn(batch, n)
    dense_w = torch.randn(n, n)
    dense = {
        "forward": median_s(lambda: x @ dense_w.t()),
        "grad_input": median_s(lambda: dy @ dense_w),
        "grad_values": median_s(lambda: dy.t() @ x),
    }
    rows = []
    with config.patch(backend="cpu"):
        for spec in SPECS:
            layer = sparsec.SparseLinear(n, n, spec=spec, bias=False)
            runs = sparse_products(layer, x, dy)
            for name, op in PRODUCTS:
                runs[name]()  # builds the plan once
                measured = median_s(runs[name])
                r = roofline(cpu_path_formulas(op, layer.layout.nnz, "fp32"), "fp32", peak, batch, n, n)
                rows.append((spec, name, r, measured, dense[name]))
                print(
                    f"{spec:<18} {name:<12} predicted {r['t_sparse'] * 1e3:8.2f} ms  measured {measured * 1e3:8.2f} ms"
                )
    lines = [
        "## Cost model calibration on the CPU path",
        "",
        f"`python bench/cost_calibration.py --size {n} --batch {batch}` on {machine()}, "
        f"{datetime.date.today().isoformat()}. Peaks measured first in the same run: "
        f"{peak.tensor_flops / 1e9:.1f} GFLOP/s (fp32 GEMM {2048}^3), {peak.bandwidth / 1e9:.1f} GB/s (64 MiB copy). "
        f"Layer {n}x{n}, batch {batch}, fp32; predicted = roofline of `passes.cost` (`cpu_path_formulas`: "
        "CSR gathers priced by their gather traffic; dense: GEMM FLOPs at the measured GEMM rate).",
        "",
        "| spec | product | bound | predicted ms | measured ms | measured / predicted "
        "| dense predicted ms | dense measured ms | dense measured / predicted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, name, r, measured, dense_measured in rows:
        lines.append(
            f"| `{spec}` | {name} | {r['bound']} | {r['t_sparse'] * 1e3:.2f} | {measured * 1e3:.2f} | "
            f"{measured / r['t_sparse']:.1f}x | {r['t_dense'] * 1e3:.2f} | {dense_measured * 1e3:.2f} | "
            f"{dense_measured / r['t_dense']:.2f}x |"
        )
    write_section("cost-calibration", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
