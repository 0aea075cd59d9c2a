"""From a layer's configuration to rendered kernel source: build programs, lower them, render.

``compile_layer`` is memoised per configuration; the sources are deterministic, so the same
configuration always maps to the same cache files. The template a program uses is the one its
format's strategy names (``Strategy.template``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sparsec.codegen.render import render
from sparsec.dtypes import KERNEL_DTYPES
from sparsec.errors import SparsecError
from sparsec.formats import format_of
from sparsec.ir.build import PROGRAMS, build_programs
from sparsec.ir.graph import Program, program_key
from sparsec.ir.ops import PRODUCTS, Op
from sparsec.passes import lower
from sparsec.spec import parse_spec

SUMMARIES = {
    "forward": "forward: Y = act(X @ W^T + b)",
    "grad_input": "grad_input: dX = dZ @ W",
    "grad_values": "grad_values: dV = (dZ^T @ X) at the kept positions",
    "grow_scores": "grow_scores: the best |dZ^T @ X| outside the kept positions, tile by tile",
}


@dataclass(frozen=True)
class KernelSource:
    program: Program  # lowered
    template: str
    source: str
    tile: dict[str, int]

    @property
    def key(self) -> str:
        return program_key(self.program)


@dataclass(frozen=True)
class LayerKernels:
    spec: str
    strategy: str
    format: str
    kernels: dict[str, KernelSource]  # program name -> source
    passes: tuple[str, ...]


@functools.cache
def compile_layer(
    spec: str, in_features: int, out_features: int, dtype: str, bias: bool, activation: str | None
) -> LayerKernels:
    """Lower the forward/backward programs of one layer configuration and render their kernels."""
    if dtype not in KERNEL_DTYPES:
        raise SparsecError(
            f"dtype {dtype} has no generated kernels (they take {', '.join(KERNEL_DTYPES)}); "
            f"run float64 on the cpu backend (SPARSEC_BACKEND=cpu)"
        )
    value = parse_spec(spec)  # compile_layer is memoised on the canonical text; the programs get the value
    spec = str(value)
    strategy = format_of(value).strategy(value)
    programs = build_programs(value, in_features, out_features, dtype, bias, activation)
    kernels, applied = {}, ()
    for name in PROGRAMS:
        lowered, applied = lower(programs[name])
        weight = lowered.node(lowered.find(Op.SPARSE)[0])
        template, fixed = strategy.template(name)
        product = next(lowered.node(n) for n in lowered.order() if lowered.node(n).op in PRODUCTS)
        params = {"bias": bool(product.attr("bias")), "activation": product.attr("activation"), **fixed}
        params["dot_args"] = ', input_precision="ieee"' if product.attr("precision") == "ieee" else ""
        source_text = _render(template, spec, dtype, program_key(lowered), SUMMARIES[name], params)
        kernels[name] = KernelSource(lowered, template, source_text, dict(product.attr("tile")))
    return LayerKernels(spec, weight.attr("strategy"), weight.attr("format"), kernels, tuple(applied))


def _render(template, spec, dtype, key, summary, params) -> str:
    return render(template, spec=spec, dtype=dtype, key=key, summary=summary, **params)
