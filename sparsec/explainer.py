"""``sparsec.explain``: every stage of a layer's lowering, as text.

The IR of each program before and after the pipeline, the passes applied, the storage format and
kernel strategy with the reason, the cost model against dense on A100 and H100, and the generated
Triton source.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsec.dtypes import DTYPES
from sparsec.dtypes import name_of as dtype_name
from sparsec.formats import make_layout
from sparsec.ir.build import build_programs
from sparsec.ir.graph import SYM
from sparsec.ir.printer import print_program
from sparsec.lazy import lazy_module
from sparsec.nn.layers import SparseLayer
from sparsec.passes.cost import GPUS, roofline
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.devices import cpu_device
from sparsec.runtime.ops import backend_for
from sparsec.runtime.strategies import PROGRAMS
from sparsec.runtime.tuner import explain_choice
from sparsec.spec import Spec, parse_spec

sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec


def _table(kernels, dtype: str, batch: int, out: int, inn: int) -> list[str]:
    lines = [
        f"cost model at batch {batch} ({dtype}; roofline on datasheet peaks, dense = cuBLAS-like dense GEMM; "
        "model output, not measurements: no kernel has been timed on a GPU):",
        "  program      gpu   GFLOP sparse/dense   MB sparse/dense   bound    predicted speed-up",
    ]
    for name, k in kernels.kernels.items():
        node = next(k.program.node(n) for n in k.program.order() if k.program.node(n).attr("cost"))
        cost = dict(node.attr("cost"))
        for gpu_name, gpu in GPUS.items():
            r = roofline(cost, dtype, gpu, batch, out, inn)
            lines.append(
                f"  {name:<12} {gpu_name:<5} {r['flops'] / 1e9:9.2f} / {r['dense_flops'] / 1e9:<9.2f}"
                f"{r['bytes'] / 1e6:8.2f} / {r['dense_bytes'] / 1e6:<8.2f} {r['bound']:<8} {r['speedup']:.2f}x"
            )
        if "worst_flops" in cost:
            lines.append(f"  {name}: one run of |dY^T X|; a layer-wide unit may score some tiles twice (worst case 2x)")
    return lines


def _choices(spec: Spec, out: int, inn: int, dtype: str, batch: int) -> list[str]:
    """What each program runs on this machine under SPARSEC_BACKEND=auto, and where the choice came from."""
    values = torch.empty(0, dtype=DTYPES[dtype].torch)  # the lookup reads its dtype and device
    backend = backend_for(values, "auto")
    key = make_layout(spec, out, inn).key
    lines = [f"strategy chosen on this machine ({cpu_device().name}, batch {batch}, SPARSEC_BACKEND=auto):"]
    choices = {program: explain_choice(program, key, backend, values, batch) for program in PROGRAMS}
    lines += [f"  {program:<12} {label:<40} {source}" for program, (label, source) in choices.items()]
    if all(source == "default" for _, source in choices.values()):
        lines.append(
            "  (no tuning entry: `sparsec tune` or SPARSEC_AUTOTUNE=1 times the candidates and stores the fastest)"
        )
    return lines


def explain_spec(
    spec: str | Spec,
    out_features: int,
    in_features: int,
    dtype: str = "fp16",
    batch: int = 4096,
    bias: bool = True,
    activation: str | None = None,
    source: bool = True,
) -> str:

    spec = parse_spec(spec)
    programs = build_programs(spec, in_features, out_features, dtype, bias, activation)
    kernels = compile_layer(str(spec), in_features, out_features, dtype, bias, activation)
    weight = next(
        kernels.kernels["forward"].program.node(n)
        for n in kernels.kernels["forward"].program.order()
        if kernels.kernels["forward"].program.node(n).attr("format")
    )
    lines = [
        f"sparsec explain: spec {spec}, weight {out_features}x{in_features}, {dtype}, bias={bias}, "
        f"activation={activation}",
        f"format: {kernels.format}   strategy: {kernels.strategy}",
        f"  why: {weight.attr('why')}",
        f"passes: {' -> '.join(kernels.passes)}",
        "",
    ]
    for name, k in kernels.kernels.items():
        lines += [
            f"== {name}: IR as built",
            print_program(programs[name]),
            "",
            f"== {name}: IR after the passes",
            print_program(k.program),
            "",
        ]
    lines += _table(kernels, dtype, batch, out_features, in_features) + [""]
    lines += _choices(spec, out_features, in_features, dtype, batch) + [""]
    if source:
        for name, k in kernels.kernels.items():
            lines += [f"== {name}: generated Triton source ({k.template})", k.source]
    return "\n".join(lines)


def explain(layer, dtype: str | None = None, batch: int = 4096, source: bool = True) -> str:
    """Explain a ``SparseLinear``/``SparseConv2d`` (its spec, shape and dtype)."""
    dt = dtype or dtype_name(layer.values.dtype)
    return explain_spec(
        layer.spec, layer.layout.out_features, layer.layout.in_features, dt, batch, layer.bias is not None, None, source
    )


def step_flops(model: nn.Module, rows: int) -> dict[str, float]:
    """The cost model's FLOPs of one training step's weight products, every layer multiplying ``rows``
    rows (tokens, for a transformer): ``sparse``, the forward, grad_input and grad_values products the
    sparse layers' kernels execute; ``dense``, the dense ``nn.Linear`` layers' (3 x 2 rows in out);
    ``grow``, the dense ``|dY^T X|`` a gradient-driven update step adds (once per sparse layer).
    Model output, not a measurement."""
    total = {"sparse": 0.0, "dense": 0.0, "grow": 0.0}
    for module in model.modules():
        if isinstance(module, SparseLayer):
            out, inn = module.layout.out_features, module.layout.in_features
            kernels = compile_layer(
                module.layout.key.spec, inn, out, dtype_name(module.values.dtype), module.bias is not None, None
            )
            for name, k in kernels.kernels.items():
                node = next(k.program.node(n) for n in k.program.order() if k.program.node(n).attr("cost"))
                flops = float(
                    sympy.sympify(dict(node.attr("cost"))["flops"]).subs({SYM.BATCH: rows, SYM.OUT: out, SYM.IN: inn})
                )
                total["grow" if name == "grow_scores" else "sparse"] += flops
        elif isinstance(module, nn.Linear):
            total["dense"] += 3 * 2 * rows * module.in_features * module.out_features
    return total
