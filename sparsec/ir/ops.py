"""The op set of sparsec's IR, grouped by role; the interpreter (``interp``) defines each one."""

from __future__ import annotations

import enum


class Op(enum.Enum):
    # arguments of a program
    DENSE = "dense"  # a dense row-major matrix argument: X [B, I] or dY [B, O]
    SPARSE = "sparse"  # the compressed weight W [O, I]: values + index buffers of one format
    VECTOR = "vector"  # a bias [O]
    # sparse products
    SPMM = "spmm"  # (X, W) -> X @ W^T                                  [B, O]
    SPMM_T = "spmm_t"  # (dY, W) -> dY @ W                                [B, I]
    SDDMM = "sddmm"  # (dY, X, W) -> (dY^T @ X) at W's kept positions     values-shaped
    GROW_TOPK = "grow_topk"  # (dY, X, W) -> per unit, the k best |dY^T X| outside W's kept positions
    # elementwise epilogues
    ADD_BIAS = "add_bias"  # (Y, b) -> Y + b
    ACTIVATION = "activation"  # (Y,) -> act(Y), attrs: fn
    # results
    OUTPUT = "output"  # (value,) -> a program result, attrs: name


ARITY: dict[Op, tuple[int, ...]] = {  # allowed argument counts
    Op.DENSE: (0,),
    Op.SPARSE: (0,),
    Op.VECTOR: (0,),
    Op.SPMM: (2, 3),  # a third argument: the bias, once fuse_epilogue folded it in
    Op.SPMM_T: (2,),
    Op.SDDMM: (3,),
    Op.GROW_TOPK: (3,),
    Op.ADD_BIAS: (2,),
    Op.ACTIVATION: (1,),
    Op.OUTPUT: (1,),
}

ACTIVATIONS = ("relu", "gelu", "silu")

# The product each program computes, by program name (formats key tiles and templates by program).
PRODUCTS: dict[Op, str] = {
    Op.SPMM: "forward",
    Op.SPMM_T: "grad_input",
    Op.SDDMM: "grad_values",
    Op.GROW_TOPK: "grow_scores",
}
