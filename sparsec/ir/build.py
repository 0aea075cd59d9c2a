"""Build the four programs of a sparse layer from its spec, shape, dtype, bias and activation.

- ``forward``:     Y = act(X @ W^T + b)
- ``grad_input``:  dX = dZ @ W            (dZ: gradient at X @ W^T, before bias and activation)
- ``grad_values``: dV = (dZ^T @ X) sampled at W's kept positions (SDDMM), values-shaped
- ``grow_scores``: per unit, the ``k`` best |dZ^T @ X| outside W's kept positions

Shapes are sympy expressions in the batch ``BATCH`` and the layer's ``OUT`` and ``IN``; the SPARSE node
records the concrete ``out_features``/``in_features`` the program is built for.
"""

from __future__ import annotations

from sparsec.dtypes import DTYPES
from sparsec.errors import SparsecError
from sparsec.formats import format_of
from sparsec.formats.base import PROGRAMS
from sparsec.ir.graph import SYM, Program, ProgramBuilder, make_node
from sparsec.ir.ops import ACTIVATIONS, Op
from sparsec.lazy import lazy_module
from sparsec.spec import Dense, Spec, parse_spec

sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec

__all__ = ["PROGRAMS", "build_programs"]


def build_programs(
    spec: str | Spec,
    in_features: int,
    out_features: int,
    dtype: str = "fp32",
    bias: bool = True,
    activation: str | None = None,
    grow_k: int = 1,
) -> dict[str, Program]:

    spec = parse_spec(spec)
    if isinstance(spec, Dense):
        raise SparsecError("spec 'dense' has no sparse programs; the layer stays a dense torch layer")
    if dtype not in DTYPES:
        raise SparsecError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    if activation is not None and activation not in ACTIVATIONS:
        raise SparsecError(f"activation {activation!r} is not supported; choose one of {ACTIVATIONS} or None")
    fmt = format_of(spec)
    values_shape = fmt.values_shape(spec)
    weight = make_node(
        Op.SPARSE,
        dtype,
        (SYM.OUT, SYM.IN),
        spec=spec,  # the frozen Spec value: passes read it, nobody re-parses a string
        out_features=out_features,
        in_features=in_features,
        values_shape=values_shape,
    )

    def start(name: str) -> tuple[ProgramBuilder, int]:
        builder = ProgramBuilder(name)
        return builder, builder.add(weight)

    fwd, w = start("forward")
    x = fwd.add(make_node(Op.DENSE, dtype, (SYM.BATCH, SYM.IN), name="x"))
    y = fwd.add(make_node(Op.SPMM, dtype, (SYM.BATCH, SYM.OUT)), x, w)
    if bias:
        y = fwd.add(
            make_node(Op.ADD_BIAS, dtype, (SYM.BATCH, SYM.OUT)),
            y,
            fwd.add(make_node(Op.VECTOR, dtype, (SYM.OUT,), name="bias")),
        )
    if activation:
        y = fwd.add(make_node(Op.ACTIVATION, dtype, (SYM.BATCH, SYM.OUT), fn=activation), y)
    fwd.add(make_node(Op.OUTPUT, dtype, (SYM.BATCH, SYM.OUT), name="y"), y)

    gin, w = start("grad_input")
    dz = gin.add(make_node(Op.DENSE, dtype, (SYM.BATCH, SYM.OUT), name="dz"))
    dx = gin.add(make_node(Op.SPMM_T, dtype, (SYM.BATCH, SYM.IN)), dz, w)
    gin.add(make_node(Op.OUTPUT, dtype, (SYM.BATCH, SYM.IN), name="dx"), dx)

    gval, w = start("grad_values")
    dz, x = (
        gval.add(make_node(Op.DENSE, dtype, (SYM.BATCH, SYM.OUT), name="dz")),
        gval.add(make_node(Op.DENSE, dtype, (SYM.BATCH, SYM.IN), name="x")),
    )
    dv = gval.add(make_node(Op.SDDMM, dtype, values_shape), dz, x, w)
    gval.add(make_node(Op.OUTPUT, dtype, values_shape, name="dvalues"), dv)

    grow, w = start("grow_scores")
    dz, x = (
        grow.add(make_node(Op.DENSE, dtype, (SYM.BATCH, SYM.OUT), name="dz")),
        grow.add(make_node(Op.DENSE, dtype, (SYM.BATCH, SYM.IN), name="x")),
    )
    cand = (fmt.units(spec), sympy.Integer(grow_k))
    top = grow.add(make_node(Op.GROW_TOPK, "fp32", cand, k=grow_k), dz, x, w)
    grow.add(make_node(Op.OUTPUT, "fp32", cand, name="candidates"), top)

    return {p.name: p.build() for p in (fwd, gin, gval, grow)}
