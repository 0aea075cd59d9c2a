"""tile: choose the tile sizes (kernel constexprs) of every product for its strategy and dtype.

Defaults, not tuned values: the autotuner replaces them per GPU. Tensor-core strategies use tiles
of at least 16 on every ``tl.dot`` side; gather strategies keep BLOCK_B x BLOCK_O x BLOCK_J small,
since their 3-D gather lives in registers.
"""

from __future__ import annotations

from sparsec.ir.graph import Program
from sparsec.ir.ops import Op
from sparsec.spec import NM, Block, parse_spec


def _pow2_at_least(n: int, floor: int = 16) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def dot_precision(op: Op, strategy: str, dtype: str) -> str:
    """How a product's tl.dot multiplies: "tensor" cores (fp16, bf16, TF32) or "ieee" fp32 on FMA units.

    fp32 is IEEE (torch's "highest" matmul precision). TF32's N:M grad_input is IEEE too: Triton 3.8
    fails to compile that TF32 dot for sm_80/sm_90a ("Illegal shared layout" in
    TritonGPUOptimizeDotOperands).
    """
    if dtype in ("fp32", "fp64") or (dtype == "tf32" and op is Op.SPMM_T and strategy == "decompress-dot"):
        return "ieee"
    return "tensor"


def tile_for(op: Op, spec, strategy: str, dtype: str) -> dict[str, int]:
    half = dot_precision(op, strategy, dtype) == "tensor"
    if op is Op.GROW_TOPK:  # a [BLOCK_O, BLOCK_K] tile of |dY^T X| per program (blocks: one block)
        if strategy == "block-dot":
            return {"BLOCK_B": 64 if half else 32, "BH": _pow2_at_least(spec.rows), "BW": _pow2_at_least(spec.cols)}
        m = spec.m if isinstance(spec, NM) else 1
        return {"BLOCK_B": 32, "BLOCK_O": 64 if half else 32, "BLOCK_K": max(64 if m > 1 else 32, m)}
    # Tensor-core dots (fp16, bf16, tf32): a 64-row M tile lets sm_90a use wgmma (one warpgroup, M = 64).
    # IEEE fp32 dots run on FMA units: smaller tiles keep them under 255 registers without spills.
    rows = 64 if half else 32
    if strategy == "decompress-dot":
        assert isinstance(spec, NM)
        if op is Op.SDDMM:  # M of its dot is BLOCK_O
            return {"BLOCK_B": 32, "BLOCK_O": rows, "BLOCK_K": max(64 if half else 32, spec.m)}
        return {"BLOCK_B": rows, "BLOCK_O": 32, "BLOCK_K": max(64 if half else 32, spec.m)}
    if strategy == "block-dot":
        assert isinstance(spec, Block)
        sides = {"BH": _pow2_at_least(spec.rows), "BW": _pow2_at_least(spec.cols)}
        return {"BLOCK_B": rows, **sides}
    if op is Op.SDDMM:
        return {"BLOCK_E": 32, "BLOCK_B": 16}
    return {"BLOCK_B": 16, "BLOCK_O": 16, "BLOCK_J": 16}


def tile(program: Program) -> Program:
    """Attach ``tile`` (sorted constexpr pairs) and the dot ``precision`` to every product node."""
    (weight,) = program.find(Op.SPARSE)
    w = program.node(weight)
    spec = parse_spec(w.attr("spec"))
    for nid in program.order():
        node = program.node(nid)
        if node.op in (Op.SPMM, Op.SPMM_T, Op.SDDMM, Op.GROW_TOPK):
            sizes = tile_for(node.op, spec, w.attr("strategy"), w.dtype)
            precision = dot_precision(node.op, w.attr("strategy"), w.dtype)
            program = program.replace_node(nid, node.with_attrs(tile=tuple(sorted(sizes.items())), precision=precision))
    return program
