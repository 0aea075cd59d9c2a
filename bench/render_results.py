"""Render bench/RESULTS.md's CPU-layer tables from a pytest-benchmark JSON (default: the newest saved run).

    pytest bench/ --benchmark-only            # saves bench/.benchmarks/<machine>/NNNN_<commit>_<time>.json
    python bench/render_results.py [RUN.json]

Ratios are dense median / other median within one run: above 1 is faster than nn.Linear.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conftest import STORAGE
from results import write_section

IMPLS = ["torch-csr", "sparsec-cpp", "sparseprop"]
PASSES = ["forward", "forward+backward"]


def newest_run() -> Path:
    runs = sorted(STORAGE.glob("*/*.json"), key=lambda p: p.name)  # NNNN_ counters order the runs
    if not runs:
        raise SystemExit(f"no saved run under {STORAGE}: run `pytest bench/ --benchmark-only` first")
    return runs[-1]


def medians(run: dict) -> dict[tuple, float]:
    """(layer, pass or None, impl) -> median seconds."""
    out = {}
    for b in run["benchmarks"]:
        info = b["extra_info"]
        out[(info.get("layer"), info.get("pass_"), info["impl"])] = b["stats"]["median"]
    return out


def layer_table(m: dict[tuple, float]) -> list[str]:
    layers = list(dict.fromkeys(layer for layer, p, _ in m if p in PASSES))
    rows = [
        "| layer | dense fwd / fwd+bwd ms | " + " | ".join(f"{i} vs dense (fwd, fwd+bwd)" for i in IMPLS) + " |",
        "|---|---|" + "---|" * len(IMPLS),
    ]
    for layer in layers:
        dense = [m.get((layer, p, "dense")) for p in PASSES]
        cells = [layer, " / ".join(f"{d * 1e3:.2f}" for d in dense)]
        for impl in IMPLS:
            got = [m.get((layer, p, impl)) for p in PASSES]
            cells.append(", ".join(f"{d / g:.2f}x" for d, g in zip(dense, got, strict=True)) if all(got) else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def grow_table(m: dict[tuple, float]) -> list[str]:
    layers = list(dict.fromkeys(layer for layer, _, impl in m if impl == "dense-gemm+topk"))
    rows = ["| layer | dense GEMM + topk ms | sparsec (cpp) ms | ratio |", "|---|---|---|---|"]
    for layer in layers:
        d, s = m[(layer, None, "dense-gemm+topk")], m[(layer, None, "sparsec-cpp")]
        rows.append(f"| {layer} | {d * 1e3:.1f} | {s * 1e3:.1f} | {d / s:.2f}x |")
    return rows


def _shown(path: Path) -> str:
    """The run's path from the repository root where it lies inside the repository, else as given."""
    root = STORAGE.parent.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def render(path: Path) -> str:
    run = json.loads(path.read_text())
    meta = run.get("sparsec", {})
    m = medians(run)
    cold, warm = m.get((None, None, "cold build")), m.get((None, None, "warm load"))
    lines = [
        "## CPU layers (pytest-benchmark): nn.Linear, torch CSR, sparsec cpp, SparseProp",
        "",
        f"Measured {meta.get('date', run['datetime'][:10])} on {meta.get('machine', run['machine_info']['cpu'])}, "
        f"commit {run['commit_info']['id'][:10]}{' (uncommitted changes)' if run['commit_info']['dirty'] else ''}. "
        f"Command: `{meta.get('command', 'pytest bench/ --benchmark-only')}`, then "
        f"`python bench/render_results.py` (this table, from `{_shown(path)}`).",
        "fp32 (rows marked bf16: every column in bf16), no bias, the same mask in every column; forward under "
        "no_grad, forward+backward of `sum()`; medians of pytest-benchmark; torch-csr is sparsec's cpu backend "
        "(PyTorch's CSR kernels; it computes half types in fp32).",
        "",
        *layer_table(m),
        "",
        "Ratios: dense time / that column's time in the same run (above 1: faster than dense).",
        "",
        "Grow step (RigL, 30% of the kept weights dropped and regrown from one step's dY, X; the same "
        "selection in both columns): sparsec's chunked selection against |dY^T X| as one dense GEMM + torch.topk.",
        "",
        *grow_table(m),
    ]
    if cold is not None and warm is not None:
        lines += ["", f"cpp compile latency: cold build {cold:.2f} s, warm load {warm * 1e3:.2f} ms."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, help="a pytest-benchmark JSON (default: the newest saved)")
    args = parser.parse_args(argv)
    path = (args.run or newest_run()).resolve()
    write_section("cpu-layers-benchmark", render(path))
    print(f"wrote bench/RESULTS.md from {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
