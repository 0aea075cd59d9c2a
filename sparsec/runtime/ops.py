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
from sparsec.dtypes import KERNEL_TORCH_DTYPES
from sparsec.dtypes import name_of as dtype_name
from sparsec.errors import SparsecError
from sparsec.formats import Layout, make_layout
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.cpu import CSRPlan, csr_forward, csr_grad_input, csr_grad_values
from sparsec.runtime.launch import Launcher
from sparsec.runtime.plan import TritonPlan
from sparsec.spec import parse_spec

_PLANS: OrderedDict = OrderedDict()  # (config, backend, index ptrs and versions) -> (index refs, plan)
_MAX_PLANS = 256


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
        plan = TritonPlan.build(layout, flat)
    _PLANS[key] = (list(index), plan)
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def kernel_launcher(config: str, values: torch.Tensor, bias: bool, backend: str):
    if values.dtype not in KERNEL_TORCH_DTYPES:
        raise SparsecError(
            f"the {backend} backend runs fp16, bf16 and fp32; this layer is {values.dtype}: "
            f"use SPARSEC_BACKEND=cpu for float64"
        )
    return _cached_launcher(config, dtype_name(values.dtype), bias, backend == "interpret")


@functools.lru_cache(maxsize=256)
def _cached_launcher(config: str, dtype: str, bias: bool, interpret: bool):
    spec, out, inn = config.rsplit("|", 2)
    kernels = compile_layer(spec, int(inn), int(out), dtype, bias, None)
    return Launcher(kernels, _layout(config), interpret=interpret)


def nm_positions(config: str, index: list[torch.Tensor]) -> torch.Tensor | None:
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
    launcher = kernel_launcher(config, values, bias is not None, backend)
    return launcher.forward(x.contiguous(), values, plan, nm_positions(config, index), bias)


@spmm.register_fake
def _(x, values, bias, index, config):
    return x.new_empty(x.shape[0], _layout(config).out_features)


@torch.library.custom_op("sparsec::spmm_grad_input", mutates_args=())
def spmm_grad_input(dy: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], config: str) -> torch.Tensor:
    backend = backend_for(dy)
    plan = index_plan(config, backend, index)
    if backend == "cpu":
        return csr_grad_input(plan, dy, values)
    launcher = kernel_launcher(config, values, False, backend)
    return launcher.grad_input(dy.contiguous(), values, plan, nm_positions(config, index))


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
    launcher = kernel_launcher(config, values, False, backend)
    return launcher.grad_values(dy.contiguous(), x.contiguous(), values, plan, nm_positions(config, index))


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
