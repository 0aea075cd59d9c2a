"""cost_model: FLOPs and bytes of every product as sympy formulas, and a roofline against dense.

Formulas are in the batch ``B`` and the layer's ``O``/``I``; ``nnz`` is the number of stored
values. The weight's format gives its index bytes and its strategy's cost terms: a strategy that
decompresses to a dense tile before ``tl.dot`` moves fewer bytes but executes the dense FLOPs; one
without tensor cores (gathers) runs on CUDA cores. Peaks are datasheet figures (dense, no sparsity
feature): bf16/fp16 tensor cores, TF32 tensor cores at half that rate, and FP32 CUDA cores for gathers
and for IEEE fp32 dots (fp32 follows torch.get_float32_matmul_precision: "highest" is IEEE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from sparsec.dtypes import DTYPES
from sparsec.formats import format_of
from sparsec.ir.graph import BATCH, IN, OUT, Program
from sparsec.ir.ops import Op


@dataclass(frozen=True)
class Peak:
    name: str
    tensor_flops: float  # bf16/fp16 dense tensor cores
    cuda_flops: float  # fp32 CUDA cores
    bandwidth: float  # bytes/s


GPUS = {
    "A100": Peak("A100 SXM", 312e12, 19.5e12, 2.04e12),
    "H100": Peak("H100 SXM", 989e12, 67e12, 3.35e12),
}


def _nnz(weight) -> sympy.Expr:
    return sympy.Mul(*weight.attr("values_shape"))


def formulas(op: Op, weight, dtype: str, precision: str = "tensor") -> dict[str, object]:
    """FLOPs and bytes of one product, sparse and dense, and the engine that executes it."""
    e = DTYPES[dtype].bytes
    nnz = _nnz(weight)
    spec = weight.attr("spec")
    fmt = format_of(spec)
    strategy = fmt.strategy(spec)
    index = fmt.index_bytes(spec, nnz)
    dense_mm = 2 * BATCH * OUT * IN
    executed = dense_mm if strategy.dense_product else 2 * BATCH * nnz
    if op is Op.GROW_TOPK:
        executed = dense_mm  # every candidate's |dY^T X| must be computed
    act_in, act_out = {
        Op.SPMM: (BATCH * IN, BATCH * OUT),
        Op.SPMM_T: (BATCH * OUT, BATCH * IN),
        Op.SDDMM: (BATCH * OUT + BATCH * IN, nnz),
        Op.GROW_TOPK: (BATCH * OUT + BATCH * IN, 0),
    }[op]
    dense_out = OUT * IN if op in (Op.SDDMM, Op.GROW_TOPK) else act_out
    dense_weight = 0 if op in (Op.SDDMM, Op.GROW_TOPK) else OUT * IN
    return {
        "flops": executed,
        "useful_flops": 2 * BATCH * nnz,
        "bytes": e * (act_in + act_out + (nnz if op in (Op.SPMM, Op.SPMM_T) else 0)) + index,
        "dense_flops": dense_mm,
        "dense_bytes": e * (act_in + dense_out + dense_weight),
        "engine": "cuda" if precision == "ieee" or not (strategy.tensor_cores or op is Op.GROW_TOPK) else "tensor",
    }


def cost_model(program: Program) -> Program:
    """Attach ``cost`` (formulas) to every product node."""
    (wid,) = program.find(Op.SPARSE)
    weight = program.node(wid)
    for nid in program.order():
        node = program.node(nid)
        if node.op in (Op.SPMM, Op.SPMM_T, Op.SDDMM, Op.GROW_TOPK):
            f = formulas(node.op, weight, weight.dtype, node.attr("precision", "tensor"))
            program = program.replace_node(nid, node.with_attrs(cost=tuple(sorted(f.items()))))
    return program


def roofline(cost: dict, dtype: str, gpu: Peak, batch: int, out: int, inn: int) -> dict[str, float]:
    """Predicted seconds of the sparse product and of dense, and the speed-up, at one shape."""
    at = {BATCH: batch, OUT: out, IN: inn}
    tensor = {"fp16": gpu.tensor_flops, "bf16": gpu.tensor_flops, "tf32": gpu.tensor_flops / 2}.get(
        dtype, gpu.cuda_flops
    )
    peak = tensor if cost["engine"] == "tensor" else gpu.cuda_flops
    flops, nbytes = float(cost["flops"].subs(at)), float(sympy.sympify(cost["bytes"]).subs(at))
    dflops, dbytes = float(cost["dense_flops"].subs(at)), float(sympy.sympify(cost["dense_bytes"]).subs(at))
    t_sparse = max(flops / peak, nbytes / gpu.bandwidth)
    t_dense = max(dflops / tensor, dbytes / gpu.bandwidth)
    return {
        "flops": flops,
        "bytes": nbytes,
        "dense_flops": dflops,
        "dense_bytes": dbytes,
        "t_sparse": t_sparse,
        "t_dense": t_dense,
        "speedup": t_dense / t_sparse if t_sparse else math.inf,
        "bound": "compute" if flops / peak >= nbytes / gpu.bandwidth else "memory",
    }
