"""The lowering passes one by one: format choice, constraints, fusion, tiling, and the cost model."""

import pytest
import sympy

from sparsec import ShapeError
from sparsec.ir.build import build_programs
from sparsec.ir.graph import SYM
from sparsec.ir.ops import Op
from sparsec.passes import PIPELINE, lower
from sparsec.passes.cost import GPUS, roofline


def _weight(program):
    return program.node(program.find(Op.SPARSE)[0])


def _product(program):
    return next(program.node(n) for n in program.order() if program.node(n).attr("cost"))


@pytest.mark.parametrize(
    "spec,fmt,strategy",
    [
        ("2:4", "nm", "decompress-dot"),
        ("1:3", "nm", "gather"),
        ("block(16x16, 50%)", "bsr", "block-dot"),
        ("fanin(k=4)", "ell", "gather"),
        ("90%", "csr", "gather"),
    ],
)
def test_choose_format(spec, fmt, strategy):
    lowered, _ = lower(build_programs(spec, 48, 32)["forward"])
    weight = _weight(lowered)
    assert (weight.attr("format"), weight.attr("strategy")) == (fmt, strategy)
    assert weight.attr("why")


def test_pipeline_order_is_the_documented_one():
    assert [name for name, _ in PIPELINE] == [
        "choose_format",
        "check_constraints",
        "fuse_epilogue",
        "tile",
        "cost_model",
    ]


def test_constraints_are_symbolic_and_explained_in_user_terms():
    lowered, _ = lower(build_programs("block(16x8, 50%)", 48, 32)["forward"])
    assert _weight(lowered).attr("constraints") == ("O % 16 == 0", "I % 8 == 0")
    with pytest.raises(
        ShapeError, match=r"block 16x8 does not tile the weight; the block height must divide out_features=40"
    ):
        lower(build_programs("block(16x8, 50%)", 48, 40)["forward"])


def test_fusion_folds_bias_and_activation_into_the_product():
    lowered, _ = lower(build_programs("2:4", 48, 32, bias=True, activation="silu")["forward"])
    spmm = lowered.node(lowered.find(Op.SPMM)[0])
    assert spmm.attr("bias") is True and spmm.attr("activation") == "silu"
    assert len(lowered.args(lowered.find(Op.SPMM)[0])) == 3
    assert not lowered.find(Op.ADD_BIAS) and not lowered.find(Op.ACTIVATION)


def test_tiles_and_precision():
    half, _ = lower(build_programs("2:4", 64, 64, dtype="fp16")["forward"])
    single, _ = lower(build_programs("2:4", 64, 64, dtype="fp32")["forward"])
    assert dict(_product(half).attr("tile"))["BLOCK_B"] == 64 and _product(half).attr("precision") == "tensor"
    assert dict(_product(single).attr("tile"))["BLOCK_B"] == 32 and _product(single).attr("precision") == "ieee"


def test_cost_model_formulas():
    nm, _ = lower(build_programs("2:4", 4096, 4096, dtype="bf16")["forward"])
    cost = dict(_product(nm).attr("cost"))
    # N:M decompresses before tl.dot: the dense FLOPs, fewer bytes (values + 1-byte positions)
    assert sympy.simplify(cost["flops"] - cost["dense_flops"]) == 0
    assert sympy.simplify(cost["useful_flops"] - SYM.BATCH * SYM.OUT * SYM.IN) == 0
    assert sympy.simplify(cost["dense_bytes"] - cost["bytes"] - SYM.IN * SYM.OUT / 2) == 0
    block, _ = lower(build_programs("block(32x32, 90%)", 4096, 4096, dtype="bf16")["forward"])
    b = dict(_product(block).attr("cost"))
    at = {SYM.BATCH: 4096, SYM.OUT: 4096, SYM.IN: 4096}
    assert float((b["flops"] / b["dense_flops"]).subs(at)) == pytest.approx(0.1, rel=1e-3)


def test_roofline_against_datasheet_peaks():
    assert (GPUS["A100"].tensor_flops, GPUS["A100"].bandwidth) == (312e12, 2.04e12)
    assert (GPUS["H100"].tensor_flops, GPUS["H100"].bandwidth) == (989e12, 3.35e12)
    nm, _ = lower(build_programs("2:4", 4096, 4096, dtype="bf16")["forward"])
    r = roofline(dict(_product(nm).attr("cost")), "bf16", GPUS["H100"], 4096, 4096, 4096)
    assert r["t_dense"] == pytest.approx(2 * 4096**3 / 989e12)
    # no sparse tensor cores in Triton: the dense FLOPs, plus 2 selects per weight per 64-row batch tile
    decompress = 4096 * 4096 * 2 * (4096 // 64) / 67e12
    assert r["bound"] == "compute" and r["t_sparse"] == pytest.approx(r["t_dense"] + decompress)
    block, _ = lower(build_programs("block(32x32, 90%)", 4096, 4096, dtype="bf16")["forward"])
    rb = roofline(dict(_product(block).attr("cost")), "bf16", GPUS["A100"], 4096, 4096, 4096)
    assert rb["speedup"] == pytest.approx(10.0, rel=1e-3) and rb["bound"] == "compute"
    gather, _ = lower(build_programs("90%", 4096, 4096, dtype="bf16")["forward"])
    rg = roofline(dict(_product(gather).attr("cost")), "bf16", GPUS["A100"], 4096, 4096, 4096)
    assert rg["speedup"] < 1.0  # 10% of the FLOPs on CUDA cores loses to dense tensor cores at this size
    # priced by its gather traffic: one bf16 activation per stored value and batch row, at DRAM bandwidth
    nnz = 4096 * 4096 - int(0.9 * 4096 * 4096)
    assert rg["bound"] == "memory" and rg["bytes"] >= 2 * 4096 * nnz
    assert rg["t_sparse"] == pytest.approx(rg["bytes"] / 2.04e12)


def test_cpu_path_formulas_count_the_gathers_by_hand():
    from sparsec.passes.cost import cpu_path_formulas

    nnz = sympy.Integer(1000)
    fwd = cpu_path_formulas(Op.SPMM, nnz, "fp32")
    # one fp32 activation per stored value and batch row, the output, values and int64 CSR once
    assert (
        sympy.simplify(
            fwd["bytes"] - (4 * SYM.BATCH * 1000 + 4 * SYM.BATCH * SYM.OUT + 4 * 1000 + 8 * 1000 + 8 * (SYM.OUT + 1))
        )
        == 0
    )
    assert sympy.simplify(fwd["flops"] - 2 * SYM.BATCH * 1000) == 0 and fwd["engine"] == "cuda"
    sddmm = cpu_path_formulas(Op.SDDMM, nnz, "fp32")  # row-wise: one gathered column per stored value
    assert (
        sympy.simplify(
            sddmm["bytes"] - (4 * SYM.BATCH * 1000 + 4 * SYM.BATCH * SYM.OUT + 4 * 1000 + 8 * 1000 + 8 * (SYM.OUT + 1))
        )
        == 0
    )


def test_the_cost_model_counts_padded_blocks():
    """block(3x3) runs 16x16 tl.dot products (sides padded to a power of two of at least 16): 256/9 of the
    useful FLOPs, so at 90% it executes 2.8x the dense FLOPs and cannot be predicted faster than dense."""
    small, _ = lower(build_programs("block(3x3, 90%)", 300, 300, dtype="bf16")["forward"])
    cost = dict(_product(small).attr("cost"))
    assert sympy.simplify(cost["flops"] - cost["useful_flops"] * sympy.Rational(256, 9)) == 0
    r = roofline(cost, "bf16", GPUS["H100"], 4096, 300, 300)
    assert r["speedup"] < 1.0
    exact, _ = lower(build_programs("block(16x16, 90%)", 320, 320, dtype="bf16")["forward"])
    exact_cost = dict(_product(exact).attr("cost"))
    assert sympy.simplify(exact_cost["flops"] - exact_cost["useful_flops"]) == 0  # no padding
