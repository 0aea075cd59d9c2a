"""cost_model: FLOPs and bytes of every product as sympy formulas, and a roofline against dense.

Formulas are in the batch ``B`` and the layer's ``O``/``I``; ``nnz`` is the number of stored
values. The weight's format gives its index bytes and its strategy's cost terms:

- a gather (no tensor cores) runs on CUDA cores and is priced by its gather traffic: every stored
  value loads one activation per batch row (``B * nnz`` elements, priced at DRAM bandwidth: no tile
  of the input is reused from shared memory, so this is an upper bound on time where caches hit),
  and re-reads the values and indices once per batch tile;
- a strategy that decompresses to a dense tile before ``tl.dot`` (N:M) executes the dense FLOPs and
  redoes the decompression for every batch tile: ``N`` selects per weight element per batch tile on
  CUDA cores (``alu_ops``, added to the roofline time; the re-reads hit L2, as dense GEMM's do);
- the grow kernel runs the dense ``|dY^T X|`` product once (``flops``); a layer-wide unit may score
  some tiles twice (``worst_flops``: twice, see runtime/grow.py).

Peaks are datasheet figures (dense, no sparsity feature): bf16/fp16 tensor cores, TF32 tensor cores at
half that rate, and FP32 CUDA cores for gathers and for IEEE fp32 dots (fp32 follows
torch.get_float32_matmul_precision: "highest" is IEEE). ``cpu_path_formulas`` prices the CPU backend
(PyTorch CSR kernels for every structure) the same way; bench/cost_calibration.py compares it with
measured times on the machine it runs on. Everything here is model output, never a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparsec.dtypes import DTYPES
from sparsec.formats import format_of
from sparsec.ir.graph import SYM, Program
from sparsec.ir.ops import Op
from sparsec.lazy import lazy_module

sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec


@dataclass(frozen=True)
class Peak:
    name: str
    tensor_flops: float  # bf16/fp16 dense tensor cores
    cuda_flops: float  # fp32 CUDA cores
    bandwidth: float  # bytes/s


GPUS = {
    "A100": Peak("A100 SXM", 312e12, 19.5e12, 2.04e12),
    "H100": Peak("H100 SXM", 989e12, 67e12, 3.35e12),
    "H200": Peak("H200 SXM", 989e12, 67e12, 4.8e12),
}


def peak_of(device_name: str) -> Peak | None:
    """The datasheet peaks of a GPU by its name (``torch.cuda.get_device_name``), None for one not listed."""
    return next((p for key, p in GPUS.items() if key in device_name.upper()), None)


def _nnz(weight) -> sympy.Expr:
    return sympy.Mul(*weight.attr("values_shape"))


def formulas(op: Op, weight, dtype: str, precision: str = "tensor", tile: dict | None = None) -> dict[str, object]:
    """FLOPs and bytes of one product, sparse and dense, and the engine that executes it."""
    e = DTYPES[dtype].bytes
    nnz = _nnz(weight)
    spec = weight.attr("spec")
    fmt = format_of(spec)
    strategy = fmt.strategy(spec)
    index = fmt.index_bytes(spec, nnz)
    gather = not (strategy.tensor_cores or strategy.dense_product)
    batch_tiles = sympy.ceiling(SYM.BATCH / (tile or {}).get("BLOCK_B", 1))
    f = _products(op, nnz, e, index, strategy.dense_product, gather, batch_tiles)
    if op is not Op.GROW_TOPK and not strategy.dense_product:
        f["flops"] = f["flops"] * sympy.nsimplify(strategy.padding(tile or {}))  # padded items run full products
    f["engine"] = "cuda" if precision == "ieee" or not (strategy.tensor_cores or op is Op.GROW_TOPK) else "tensor"
    if op is Op.GROW_TOPK and fmt.units(spec) == 1:  # a layer-wide unit: some tiles may be scored twice
        f["worst_flops"] = 2 * f["flops"]
    if strategy.dense_product and op in (Op.SPMM, Op.SPMM_T):  # decompressed again for every batch tile
        f["alu_ops"] = SYM.OUT * SYM.IN * spec.n * batch_tiles
    return f


def cpu_path_formulas(op: Op, nnz, dtype: str) -> dict[str, object]:
    """The CPU backend's products for ``nnz`` stored weights: PyTorch CSR kernels gathering for every
    structure (the weight streamed once, one activation gathered per stored value and batch row); the
    grow step's chunked dense product in torch. Its SDDMM (``sampled_addmm``) walks the rows: one row of
    ``dY^T`` serves every stored value of the row, so it gathers one column per value, not two."""
    e = DTYPES[dtype].bytes
    index = 8 * nnz + 8 * (SYM.OUT + 1)  # int64 CSR (what torch.sparse_csr_tensor keeps by default)
    f = _products(op, nnz, e, index, False, op is not Op.GROW_TOPK, 1)
    if op is Op.SDDMM:
        f["bytes"] = e * (SYM.BATCH * nnz + SYM.BATCH * SYM.OUT + nnz) + index
    f["engine"] = "cuda"
    return f


def _products(op: Op, nnz, e: int, index, dense_product: bool, gather: bool, batch_tiles) -> dict[str, object]:
    dense_mm = 2 * SYM.BATCH * SYM.OUT * SYM.IN
    executed = dense_mm if dense_product else 2 * SYM.BATCH * nnz
    if op is Op.GROW_TOPK:
        executed = dense_mm  # every candidate's |dY^T X| must be computed
    act_in, act_out = {
        Op.SPMM: (SYM.BATCH * SYM.IN, SYM.BATCH * SYM.OUT),
        Op.SPMM_T: (SYM.BATCH * SYM.OUT, SYM.BATCH * SYM.IN),
        Op.SDDMM: (SYM.BATCH * SYM.OUT + SYM.BATCH * SYM.IN, nnz),
        Op.GROW_TOPK: (SYM.BATCH * SYM.OUT + SYM.BATCH * SYM.IN, 0),
    }[op]
    dense_out = SYM.OUT * SYM.IN if op in (Op.SDDMM, Op.GROW_TOPK) else act_out
    dense_weight = 0 if op in (Op.SDDMM, Op.GROW_TOPK) else SYM.OUT * SYM.IN
    nbytes = e * (act_in + act_out + (nnz if op in (Op.SPMM, Op.SPMM_T) else 0)) + index
    if gather and op in (Op.SPMM, Op.SPMM_T):  # one activation per stored value and batch row, weight per tile
        nbytes = e * (SYM.BATCH * nnz + act_out) + (e * nnz + index) * batch_tiles
    elif gather and op is Op.SDDMM:  # a dot of two gathered columns per stored value
        nbytes = e * (2 * SYM.BATCH * nnz + nnz) + index
    return {
        "flops": executed,
        "useful_flops": 2 * SYM.BATCH * nnz,
        "bytes": nbytes,
        "dense_flops": dense_mm,
        "dense_bytes": e * (act_in + dense_out + dense_weight),
    }


def cost_model(program: Program) -> Program:
    """Attach ``cost`` (formulas) to every product node."""
    (wid,) = program.find(Op.SPARSE)
    weight = program.node(wid)
    for nid in program.order():
        node = program.node(nid)
        if node.op in (Op.SPMM, Op.SPMM_T, Op.SDDMM, Op.GROW_TOPK):
            tile = dict(node.attr("tile", ()))
            f = formulas(node.op, weight, weight.dtype, node.attr("precision", "tensor"), tile)
            program = program.replace_node(nid, node.with_attrs(cost=tuple(sorted(f.items()))))
    return program


def roofline(cost: dict, dtype: str, gpu: Peak, batch: int, out: int, inn: int) -> dict[str, float]:
    """Predicted seconds of the sparse product and of dense, and the speed-up, at one shape."""
    at = {SYM.BATCH: batch, SYM.OUT: out, SYM.IN: inn}
    tensor = {"fp16": gpu.tensor_flops, "bf16": gpu.tensor_flops, "tf32": gpu.tensor_flops / 2}.get(
        dtype, gpu.cuda_flops
    )
    peak = tensor if cost["engine"] == "tensor" else gpu.cuda_flops
    flops, nbytes = float(cost["flops"].subs(at)), float(sympy.sympify(cost["bytes"]).subs(at))
    dflops, dbytes = float(cost["dense_flops"].subs(at)), float(sympy.sympify(cost["dense_bytes"]).subs(at))
    alu = float(sympy.sympify(cost.get("alu_ops", 0)).subs(at))
    t_sparse = max(flops / peak, nbytes / gpu.bandwidth) + alu / gpu.cuda_flops
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
