"""Sparse layers as ``torch.library`` custom ops with autograd and fake implementations.

``sparsec::spmm(x, values, bias, index, config)`` is ``x @ W^T + bias`` for the compressed weight
given by ``values`` and the format's ``index`` buffers; ``config`` ("spec|out|in") names the layout.
Its backward calls ``sparsec::spmm_grad_input`` and ``sparsec::spmm_grad_values``. Eager mode,
``torch.compile(fullgraph=True)`` and DDP see ordinary operators.

Backends (``SPARSEC_BACKEND``): ``triton`` (generated kernels on CUDA), ``interpret`` (the same
kernels in Triton's interpreter, CPU), ``cpu`` (PyTorch's CSR kernels); ``auto`` picks triton for
CUDA tensors and cpu otherwise.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

from sparsec import config as settings
from sparsec.dsl.spec import parse_spec
from sparsec.errors import SparsecError
from sparsec.nn.formats import Layout, make_layout
from sparsec.nn.functional import CSRPlan, csr_forward, csr_grad_input, csr_grad_values

_PLANS: OrderedDict = OrderedDict()  # (config, backend, index ptrs and versions) -> (index refs, plan)
_MAX_PLANS = 256
_KERNEL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def kernel_dtype(dtype: torch.dtype) -> str:
    """Kernel dtype name; float32 follows torch.set_float32_matmul_precision ("highest": IEEE, else TF32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return _KERNEL_DTYPES[dtype]


def layer_config(spec, out_features: int, in_features: int) -> str:
    return f"{parse_spec(spec)}|{out_features}|{in_features}"


@functools.cache
def _layout(config: str) -> Layout:
    spec, out, inn = config.rsplit("|", 2)
    return make_layout(parse_spec(spec), int(out), int(inn))


def backend_for(t: torch.Tensor) -> str:
    backend = settings.backend
    if backend == "auto":
        return "triton" if t.is_cuda else "cpu"
    if backend == "triton" and not t.is_cuda:
        raise SparsecError("SPARSEC_BACKEND=triton needs CUDA tensors; on a CPU use cpu or interpret")
    if backend == "interpret" and t.is_cuda:
        raise SparsecError("SPARSEC_BACKEND=interpret runs Triton's interpreter on CPU tensors; move them to the CPU")
    return backend


def index_plan(config: str, backend: str, index: list[torch.Tensor]):
    """The index plan for these buffers, built once per mask (entries hold their tensors alive, so a
    data pointer cannot be reused by another tensor while its entry exists)."""
    key = (config, backend, tuple((t.data_ptr(), t._version, t.device) for t in index))
    hit = _PLANS.get(key)
    if hit is not None:
        _PLANS.move_to_end(key)
        return hit[1]
    layout = _layout(config)
    flat = layout.decode({name: t for (name, _, _), t in zip(layout.buffers, index, strict=True)})
    if backend == "cpu":
        plan = CSRPlan.build(layout, flat)
    else:
        from sparsec.runtime.plan import TritonPlan

        plan = TritonPlan.build(layout, flat)
    _PLANS[key] = (list(index), plan)
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def _launcher(config: str, values: torch.Tensor, bias: bool, backend: str):
    if values.dtype not in _KERNEL_DTYPES:
        raise SparsecError(
            f"the {backend} backend runs fp16, bf16 and fp32; this layer is {values.dtype}: "
            f"use SPARSEC_BACKEND=cpu for float64"
        )
    return _cached_launcher(config, kernel_dtype(values.dtype), bias, backend == "interpret")


@functools.lru_cache(maxsize=256)
def _cached_launcher(config: str, dtype: str, bias: bool, interpret: bool):
    from sparsec.runtime.compile import compile_layer
    from sparsec.runtime.launch import Launcher

    spec, out, inn = config.rsplit("|", 2)
    kernels = compile_layer(spec, int(inn), int(out), dtype, bias, None)
    return Launcher(kernels, _layout(config), interpret=interpret)


def _nm_positions(config: str, index: list[torch.Tensor]) -> torch.Tensor | None:
    return index[0] if _layout(config).buffers[0][0] == "nm_positions" else None


@torch.library.custom_op("sparsec::spmm", mutates_args=())
def spmm(
    x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, index: list[torch.Tensor], config: str
) -> torch.Tensor:
    backend = backend_for(x)
    plan = index_plan(config, backend, index)
    if backend == "cpu":
        y = csr_forward(plan, x, values)
        return y if bias is None else y + bias
    launcher = _launcher(config, values, bias is not None, backend)
    return launcher.forward(x.contiguous(), values, plan, _nm_positions(config, index), bias)


@spmm.register_fake
def _(x, values, bias, index, config):
    return x.new_empty(x.shape[0], _layout(config).out_features)


@torch.library.custom_op("sparsec::spmm_grad_input", mutates_args=())
def spmm_grad_input(dy: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], config: str) -> torch.Tensor:
    backend = backend_for(dy)
    plan = index_plan(config, backend, index)
    if backend == "cpu":
        return csr_grad_input(plan, dy, values)
    launcher = _launcher(config, values, False, backend)
    return launcher.grad_input(dy.contiguous(), values, plan, _nm_positions(config, index))


@spmm_grad_input.register_fake
def _(dy, values, index, config):
    return dy.new_empty(dy.shape[0], _layout(config).in_features)


@torch.library.custom_op("sparsec::spmm_grad_values", mutates_args=())
def spmm_grad_values(
    dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], config: str
) -> torch.Tensor:
    backend = backend_for(dy)
    plan = index_plan(config, backend, index)
    if backend == "cpu":
        return csr_grad_values(plan, dy, x, values)
    launcher = _launcher(config, values, False, backend)
    return launcher.grad_values(dy.contiguous(), x.contiguous(), values, plan, _nm_positions(config, index))


@spmm_grad_values.register_fake
def _(dy, x, values, index, config):
    return values.new_empty(values.shape)


def _setup(ctx, inputs, output):
    x, values, bias, index, config = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.config, ctx.has_bias = config, bias is not None


def _backward(ctx, dy):
    x, values, *index = ctx.saved_tensors
    dx = spmm_grad_input(dy, values, index, ctx.config) if ctx.needs_input_grad[0] else None
    dv = spmm_grad_values(dy, x, values, index, ctx.config) if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dv, db, [None] * len(index), None


spmm.register_autograd(_backward, setup_context=_setup)


def grow_selector(
    layout: Layout, kept: torch.Tensor, dropped: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, regrow_dropped: bool
):
    """Grow selection on the generated ``grow_scores`` kernel (triton, interpret); None on the cpu backend."""
    backend = backend_for(dy)
    if backend == "cpu" or dy.dtype not in _KERNEL_DTYPES:
        return None
    from sparsec.runtime.grow import grow_on_kernels

    config = layer_config(layout.spec, layout.out_features, layout.in_features)
    launcher = _launcher(config, dy, False, backend)
    if launcher.kernels.format == "nm" and launcher.kernels.strategy == "gather":
        return None  # groups of a non-power-of-two M straddle the kernel's segments: the exactness check needs nesting
    index = list(layout.encode(kept).values())
    plan = index_plan(config, backend, index)
    positions = _nm_positions(config, index)
    return grow_on_kernels(launcher, layout, plan, positions, kept, dropped, dy, x, regrow_dropped)
