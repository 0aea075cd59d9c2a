"""Sparse layers as ``torch.library`` custom ops with autograd and fake implementations.

``sparsec::spmm(x, values, bias, index, spec, out_features, in_features)`` is ``x @ W^T + bias`` for
the compressed weight given by ``values`` and the format's ``index`` buffers; ``spec`` (canonical
text), ``out_features`` and ``in_features`` name the layout (``LayoutKey``: a layer stores one and
splats it into the call). Its backward calls ``sparsec::spmm_grad_input`` and
``sparsec::spmm_grad_values``. Eager mode, ``torch.compile(fullgraph=True)`` and DDP see ordinary
operators.

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
from sparsec.formats import LayoutKey, layout_of
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.cpu import CSRPlan, csr_forward, csr_grad_input, csr_grad_values
from sparsec.runtime.launch import Launcher

_PLANS: OrderedDict = OrderedDict()  # (layout key, backend, index ptrs and versions) -> (index refs, plan)
_MAX_PLANS = 256


def backend_for(t: torch.Tensor) -> str:
    backend = settings.backend
    if backend == "auto":
        return "triton" if t.is_cuda else "cpu"
    if backend == "triton" and not t.is_cuda:
        raise SparsecError("SPARSEC_BACKEND=triton needs CUDA tensors; on a CPU use cpu or interpret")
    if backend == "interpret" and t.is_cuda:
        raise SparsecError("SPARSEC_BACKEND=interpret runs Triton's interpreter on CPU tensors; move them to the CPU")
    return backend


def index_plan(key: LayoutKey, backend: str, index: list[torch.Tensor]):
    """The index plan for these buffers, built once per mask: the CSR structures of the cpu backend, or
    the tensors the format's kernels read. Entries hold their tensors alive, so a data pointer cannot
    be reused by another tensor while its entry exists."""
    entry = (key, backend, tuple((t.data_ptr(), t._version, t.device) for t in index))
    hit = _PLANS.get(entry)
    if hit is not None:
        _PLANS.move_to_end(entry)
        return hit[1]
    layout = layout_of(*key)
    buffers = {name: t for (name, _, _), t in zip(layout.buffers, index, strict=True)}
    if backend == "cpu":
        plan = CSRPlan.build(layout, layout.decode(buffers))
    else:
        plan = layout.format.strategy(layout.spec).plan(layout, buffers)
    _PLANS[entry] = (list(index), plan)
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def kernel_launcher(key: LayoutKey, values: torch.Tensor, bias: bool, backend: str) -> Launcher:
    if values.dtype not in KERNEL_TORCH_DTYPES:
        raise SparsecError(
            f"the {backend} backend runs fp16, bf16 and fp32; this layer is {values.dtype}: "
            f"use SPARSEC_BACKEND=cpu for float64"
        )
    return _cached_launcher(key, dtype_name(values.dtype), bias, backend == "interpret")


@functools.lru_cache(maxsize=256)
def _cached_launcher(key: LayoutKey, dtype: str, bias: bool, interpret: bool) -> Launcher:
    kernels = compile_layer(key.spec, key.in_features, key.out_features, dtype, bias, None)
    return Launcher(kernels, layout_of(*key), interpret=interpret)


@torch.library.custom_op("sparsec::spmm", mutates_args=())
def spmm(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    index: list[torch.Tensor],
    spec: str,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    key = LayoutKey(spec, out_features, in_features)
    backend = backend_for(x)
    plan = index_plan(key, backend, index)
    if backend == "cpu":
        y = csr_forward(plan, x, values)
        return y if bias is None else y + bias
    launcher = kernel_launcher(key, values, bias is not None, backend)
    return launcher.run("forward", plan, x=x.contiguous(), values=values, bias=bias)


@spmm.register_fake
def _(x, values, bias, index, spec, out_features, in_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("sparsec::spmm_grad_input", mutates_args=())
def spmm_grad_input(
    dy: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], spec: str, out_features: int, in_features: int
) -> torch.Tensor:
    key = LayoutKey(spec, out_features, in_features)
    backend = backend_for(dy)
    plan = index_plan(key, backend, index)
    if backend == "cpu":
        return csr_grad_input(plan, dy, values)
    return kernel_launcher(key, values, False, backend).run("grad_input", plan, dz=dy.contiguous(), values=values)


@spmm_grad_input.register_fake
def _(dy, values, index, spec, out_features, in_features):
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("sparsec::spmm_grad_values", mutates_args=())
def spmm_grad_values(
    dy: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    index: list[torch.Tensor],
    spec: str,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    key = LayoutKey(spec, out_features, in_features)
    backend = backend_for(dy)
    plan = index_plan(key, backend, index)
    if backend == "cpu":
        return csr_grad_values(plan, dy, x, values)
    launcher = kernel_launcher(key, values, False, backend)
    return launcher.run("grad_values", plan, dz=dy.contiguous(), x=x.contiguous(), values=values)


@spmm_grad_values.register_fake
def _(dy, x, values, index, spec, out_features, in_features):
    return values.new_empty(values.shape)


def _setup(ctx, inputs, output):
    x, values, bias, index, *key = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.key, ctx.has_bias = LayoutKey(*key), bias is not None


def _backward(ctx, dy):
    x, values, *index = ctx.saved_tensors
    dx = spmm_grad_input(dy, values, index, *ctx.key) if ctx.needs_input_grad[0] else None
    dv = spmm_grad_values(dy, x, values, index, *ctx.key) if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dv, db, [None] * len(index), None, None, None


spmm.register_autograd(_backward, setup_context=_setup)
