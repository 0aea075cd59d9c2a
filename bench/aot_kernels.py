"""Per-kernel table of the ahead-of-time compiles (sm_80, sm_90a) into bench/RESULTS.md.

    python bench/aot_kernels.py        # in a shell without TRITON_INTERPRET

Registers and spills come from ptxas -v, shared memory from Triton's metadata, instruction counts
from the PTX: `mma.sync` (Ampere tensor cores), `wgmma.mma_async` (Hopper warpgroup MMA) and
`cp.async` (asynchronous global-to-shared copies, i.e. software pipelining).
"""

from __future__ import annotations

import datetime

from results import machine, write_section

from sparsec.runtime.aot import compile_matrix


def main() -> None:
    reports = compile_matrix()
    fields = ("registers", "spill_bytes", "shared_bytes", "mma_sync", "wgmma", "cp_async")
    rows = [
        f"| `{r['spec']}` | {r['dtype']} | {r['program']} | `{r['template'].removesuffix('.py.jinja')}` | "
        f"{r['arch']} | " + " | ".join(str(r[f]) for f in fields) + " |"
        for r in reports
    ]
    body = "\n".join(
        [
            "## Generated kernels compiled ahead of time (no GPU)",
            "",
            f"Compiled {datetime.date.today().isoformat()} on {machine()} with `python bench/aot_kernels.py`:",
            "`triton.compile(ASTSource(..., attrs=divisibility 16), target=GPUTarget('cuda', 80|90, 32))` at the",
            "default tiles, for the structures of the interpreter tests. Nothing here ran on a GPU.",
            "",
            "| spec | dtype | program | template | arch | registers | spill bytes | shared bytes | mma.sync | wgmma "
            "| cp.async |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Reading it: fp16, bf16 and tf32 dots use tensor cores (mma.sync on sm_80; wgmma on sm_90a wherever",
            "the dot's M tile is 64; the block SDDMM and block grow kernels take the block height as M, so blocks",
            "under 64 rows use mma.sync on Hopper). `fp32` is IEEE (torch's default `highest` matmul precision):",
            "FMA units, no MMA instructions; the N:M fp32 kernels sit at 255 registers (no spills). `tf32` is what",
            "`torch.set_float32_matmul_precision('high')` selects; its N:M grad_input stays IEEE because Triton",
            "3.8 fails to compile that TF32 dot. Gather kernels (unstructured, fan-in, M not a power of two) use",
            "no tensor cores; their grow kernels do (they score a dense tile with tl.dot, then tl.topk).",
        ]
    )
    write_section("aot-kernels", body)
    print(f"wrote {len(reports)} kernel reports to bench/RESULTS.md")


if __name__ == "__main__":
    main()
