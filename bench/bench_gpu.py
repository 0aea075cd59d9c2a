"""GPU benchmark: per spec, forward and forward+backward of sparsec (untuned and tuned) against cuBLAS dense,
cuSPARSE CSR, PyTorch's BSR Triton kernels (block specs) and semi-structured 2:4, side by side in one run.

    python bench/bench_gpu.py [--size 4096] [--tokens 8192] [--dtype fp16]

Columns (ms, median of 10 after 3 warm-up calls, CUDA events): dense = nn.Linear (cuBLAS); sparsec =
SPARSEC_BACKEND=triton (generated kernels at their default tiles); tuned = SPARSEC_BACKEND=auto after
``sparsec tune`` chose each program's strategy and configuration at this batch (into a fresh cache); CSR =
SPARSEC_BACKEND=cpu on CUDA tensors (PyTorch's CSR: cuSPARSE); BSR = ``torch.sparse._triton_ops.bsr_dense_mm``
on the layer's blocks (forward only: it has no backward); semi-structured = ``to_sparse_semi_structured`` of the
2:4 weight, compressed once (forward only, as inference runs it). Writes the table into bench/RESULTS.md.
``--dry-run`` runs it all on the CPU (Triton's interpreter, a tiny layer, wall-clock timing; tuned and the
GPU-only columns left out) and writes nothing: tests/unit/test_gpu_scripts.py keeps the script working.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile

import torch
from gpu_check import cuda_ms, wall_ms
from results import write_section

import sparsec
from sparsec import config
from sparsec.tuning import tune_model

SPECS = ["90%", "95%", "99%", "2:4", "block(32x32, 90%)", "fanin(90%)"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _steps(module, x, dy):
    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        module(x).backward(dy)

    return forward, forward_backward


def _bsr_forward(layer, x):
    from torch.sparse._triton_ops import bsr_dense_mm  # CUDA + triton only; imported where it runs

    rows, cols = layer.spec.rows, layer.spec.cols
    w = layer.dense_weight().to_sparse_bsr((rows, cols))

    def forward():
        with torch.no_grad():
            bsr_dense_mm(w, x.t())

    return forward


def _semi_forward(layer, x):
    w = torch.sparse.to_sparse_semi_structured(layer.dense_weight().to(x.dtype))

    def forward():
        with torch.no_grad():
            torch.nn.functional.linear(x, w)

    return forward


def time_specs(size: int, tokens: int, dtype: torch.dtype, dry_run: bool = False) -> list[dict]:
    torch.manual_seed(0)
    device, backend, timer = ("cpu", "interpret", wall_ms) if dry_run else ("cuda", "triton", cuda_ms)
    x = torch.randn(tokens, size, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, size, device=device, dtype=dtype)
    dense = torch.nn.Linear(size, size, bias=False, device=device, dtype=dtype)
    dense_f, dense_fb = (timer(s) for s in _steps(dense, x, dy))
    rows = []
    for spec in SPECS:
        layer = sparsec.SparseLinear(size, size, bias=False, spec=spec, device=device, dtype=dtype)
        f, fb = _steps(layer, x, dy)
        row = {"spec": spec, "dense": (dense_f, dense_fb)}
        for name, setting in (("sparsec", backend), ("CSR", "cpu")):
            with config.patch(backend=setting):
                row[name] = (timer(f), timer(fb))
        if not dry_run:
            tuned = tune_model(layer, [tokens], progress=False)
            row["choice"] = "/".join(r.chosen or "-" for _, _, _, r, _ in tuned)
            with config.patch(backend="auto"):
                row["tuned"] = (timer(f), timer(fb))
            if spec.startswith("block"):
                row["BSR"] = (timer(_bsr_forward(layer, x.detach())), None)
            if spec == "2:4" and dtype != torch.float32 and torch.cuda.get_device_capability() >= (8, 0):
                row["semi-structured"] = (timer(_semi_forward(layer, x.detach())), None)
        rows.append(row)
        print(spec, {k: v for k, v in row.items() if k != "spec"}, flush=True)
        del layer
    return rows


COLUMNS = ["dense", "sparsec", "tuned", "CSR", "BSR", "semi-structured"]


def _cell(row: dict, name: str, i: int) -> str:
    value = row.get(name, (None, None))[i]
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="in = out features")
    parser.add_argument("--tokens", type=int, default=8192, help="batch rows (tokens)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny layer, writes nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        time_specs(64, 32, torch.float32, dry_run=True)
        return 0
    if not torch.cuda.is_available():
        print("bench/bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run")
        return 2
    import triton  # only here: the GPU run reports the Triton it compiled with

    with tempfile.TemporaryDirectory() as cache, config.patch(cache_dir=cache):  # tuned from scratch
        rows = time_specs(args.size, args.tokens, DTYPES[args.dtype])
    header = " | ".join(f"{c} fwd ms | {c} fwd+bwd ms" for c in COLUMNS)
    lines = [
        "## GPU: sparsec untuned and tuned against cuBLAS, cuSPARSE, BSR and semi-structured 2:4",
        "",
        f"`python bench/bench_gpu.py --size {args.size} --tokens {args.tokens} --dtype {args.dtype}` on "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, triton "
        f"{triton.__version__}, {datetime.date.today().isoformat()}. Columns: see the script's docstring; '-' where a "
        "column does not apply (BSR: block specs; semi-structured: 2:4; both forward only).",
        "",
        f"| spec | {header} | tuned choice (forward/grad_input/grad_values) |",
        "|---|" + "---|" * (2 * len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = " | ".join(f"{_cell(row, c, 0)} | {_cell(row, c, 1)}" for c in COLUMNS)
        lines.append(f"| `{row['spec']}` | {cells} | {row.get('choice', '-')} |")
    write_section("gpu-bench", "\n".join(lines))
    print("wrote bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
