"""Ahead-of-time compilation of every generated kernel for real GPUs, without one.

The launchers run on small CPU tensors with launching replaced by recording; each recorded call
becomes ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` with the divisibility
hints Triton's JIT would give (16-byte aligned pointers, integers divisible by 16), so the PTX is
what a GPU would run: pipelined, with its real register and shared-memory use. ptxas reports
registers and spills (ptxas -v, as Triton invokes it); the PTX is searched for tensor-core and async-copy instructions.

Run in a process *without* ``TRITON_INTERPRET`` (the interpreter replaces jit functions):

    python -m sparsec.runtime.aot [--json report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from sparsec.codegen.cache import load_kernel_module
from sparsec.dtypes import DTYPES, KERNEL_DTYPES, pointer_of
from sparsec.formats import KERNEL_CASES, make_layout
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.launch import Launcher, kernel_parameters
from sparsec.spec import parse_spec

# Compute capability, the arch ptxas names, and the opt-in shared memory limit per block (bytes).
ARCHS = {"sm_80": (80, "sm_80", 166912), "sm_90a": (90, "sm_90a", 232448)}
# The opt-in shared memory per block of each compute capability (CUDA programming guide, table 21)
SHARED_LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def arch_of(cc: int) -> tuple[int, str, int]:
    """(cc, the arch ptxas names, shared limit) for a GPU of compute capability ``cc`` (86 for 8.6)."""
    if cc not in SHARED_LIMITS:
        raise ValueError(f"no shared-memory limit known for compute capability {cc}: add it to SHARED_LIMITS")
    return cc, f"sm_{cc}a" if cc >= 90 else f"sm_{cc}", SHARED_LIMITS[cc]  # as Triton targets cc >= 90


# Every format's example cases, on shapes that are not multiples of any tile: the interpreter tests
# run these same cases (tests/interpret/test_kernels.py), and AOT compiles them at the default tiles.
MATRIX = list(KERNEL_CASES)


@dataclass
class KernelReport:
    spec: str
    dtype: str
    program: str
    template: str
    arch: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    shared_limit: int
    mma_sync: int
    wgmma: int
    cp_async: int
    uses_dot: bool


@dataclass
class RecordedCall:
    program: str
    source: str
    template: str
    args: dict  # tensors and sizes by parameter name, in signature order
    constexprs: dict
    options: dict  # num_warps, num_stages where a configuration sets them


def record_calls(
    spec: str, out: int, inn: int, dtype: str, batch: int = 19, configs: dict | None = None
) -> list[RecordedCall]:
    """The kernel calls of the four programs of one layer, recorded, not launched (grow_scores only where
    the format's strategy grows on a kernel); ``configs``: a ``LaunchConfig`` per program (else defaults)."""
    calls: list[RecordedCall] = []
    configs = configs or {}

    class Recorder(Launcher):
        def _launch(self, program, grid, args, constexprs, options):
            src = self.kernels.kernels[program]
            label = f"{program} (listed tiles)" if constexprs.get("LISTED") else program
            calls.append(RecordedCall(label, src.source, src.template, args, constexprs, options))

    torch_dtype = DTYPES[dtype].torch
    layout = make_layout(parse_spec(spec), out, inn)
    flat = layout.random_positions()
    launcher = Recorder(compile_layer(str(layout.spec), inn, out, dtype, True, "relu"), layout, interpret=False)
    plan = launcher.plan(layout.encode(flat))
    values = torch.zeros(layout.values_shape, dtype=torch_dtype)
    bias = torch.zeros(out, dtype=torch_dtype)
    x, dz = torch.zeros(batch, inn, dtype=torch_dtype), torch.zeros(batch, out, dtype=torch_dtype)
    launcher.run("forward", plan, configs.get("forward"), x=x, values=values, bias=bias)
    launcher.run("grad_input", plan, configs.get("grad_input"), dz=dz, values=values)
    launcher.run("grad_values", plan, configs.get("grad_values"), dz=dz, x=x, values=values)
    if launcher.strategy.grows_on_kernel:
        drop = torch.zeros(layout.n_items, dtype=torch.uint8)
        launcher.run("grow_scores", plan, dz=dz, x=x, drop=drop, kc=2)
        seg = launcher.grow_segment()
        if seg is not None:  # the second run's variant: listed tiles, every eligible key of a segment
            launcher.run("grow_scores", plan, dz=dz, x=x, drop=drop, kc=seg, tiles=torch.zeros(1, 2, dtype=torch.int32))
    return calls


def _signature(fn, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    signature, attrs = {}, {}
    for i, (name, constexpr) in enumerate(kernel_parameters(fn)):
        if constexpr:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = pointer_of(value.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned or better
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, dict(constexprs), attrs


def compile_call(call: RecordedCall, arch: str | int) -> dict:
    """Compile one recorded call for ``arch`` (a name of ARCHS, or a compute capability); returns the
    report fields (ptxas log parsed)."""
    import triton  # lazy: triton is optional (Linux only) and heavy; only AOT compilation needs it
    from triton.backends.compiler import GPUTarget  # lazy, as above
    from triton.compiler import ASTSource  # lazy, as above

    cc, ptx_arch, limit = ARCHS[arch] if isinstance(arch, str) else arch_of(arch)
    fn = load_kernel_module(call.source).kernel
    signature, constexprs, attrs = _signature(fn, call.args, call.constexprs)
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", cc, 32),
        options=call.options or None,
    )
    ptx = compiled.asm["ptx"]
    text = ptxas_report(ptx, cc, ptx_arch)
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return {
        "registers": regs,
        "spill_bytes": spills,
        "shared_bytes": int(compiled.metadata.shared),
        "shared_limit": limit,
        "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\b", ptx)),
        "uses_dot": "tl.dot(" in call.source,
    }


def ptxas_report(ptx: str, cc: int, arch: str) -> str:
    """ptxas -v on the PTX (run here, not read from Triton's log: a Triton cache hit prints nothing)."""
    from triton.backends.nvidia.compiler import get_ptxas  # lazy, as above

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", src + ".cubin"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stderr + done.stdout


def _compile_case(case: tuple[str, int, int, str]) -> list[dict]:
    spec, out, inn, dtype = case
    reports = []
    for call in record_calls(spec, out, inn, dtype):
        for arch in ARCHS:
            fields = compile_call(call, arch)
            reports.append(asdict(KernelReport(spec, dtype, call.program, call.template, arch, **fields)))
    return reports


def compile_matrix(matrix=MATRIX, dtypes=KERNEL_DTYPES, workers: int | None = None) -> list[dict]:
    """Compile every kernel of every (structure, dtype) for every arch; one report per kernel and arch."""
    if os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
        raise RuntimeError("ahead-of-time compilation needs a process without TRITON_INTERPRET")
    cases = [(spec, out, inn, dtype) for spec, out, inn in matrix for dtype in dtypes]
    with ProcessPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return [r for reports in pool.map(_compile_case, cases) for r in reports]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile sparsec's generated kernels for sm_80 and sm_90a.")
    parser.add_argument("--json", help="write the reports to this file (default: stdout)")
    args = parser.parse_args(argv)
    reports = compile_matrix()
    text = json.dumps(reports, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
