"""Sparse layers as ``torch.library`` custom ops with autograd and fake implementations.

``sparsec::spmm(x, values, bias, index, family, out_features, in_features)`` is ``x @ W^T + bias`` for
the compressed weight given by ``values`` and the format's ``index`` buffers; ``family`` (the structure
without its kept count: ``unstructured``, ``block(16x16)``, ``fanin``, ``2:4``), ``out_features`` and
``in_features`` are the layout's ``op_key`` (a layer splats it into the call), and the values' size
is the kept count. A density change (gmp, snfs) so changes tensor sizes only, never a constant of a
compiled graph. Its backward calls ``sparsec::spmm_grad_input`` and
``sparsec::spmm_grad_values``. Eager mode, ``torch.compile(fullgraph=True)`` and DDP see ordinary
operators.

A grow step's dense-gradient capture is a *tap* on the layer's index buffers (``set_tap``):
``spmm_grad_values`` hands its ``dY`` and ``X`` to the tap when one is set. The tap lives outside
every traced graph (the op reads it when it runs), so an armed step runs the graph an unarmed step
runs: compiled training has no graph break and no recompile at an update.

Eager calls skip the op's dispatch where nothing traces or watches them (``eager_call_allowed``):
inference runs ``spmm_eager``, and training on the cpp backend ``spmm_eager_training``, an autograd
Function with the op's forward and backward that hands the step's batch tiles to its gradient dots.

Backends (``SPARSEC_BACKEND``): ``triton`` (generated kernels on CUDA), ``interpret`` (the same
kernels in Triton's interpreter, CPU), ``cpu`` (PyTorch's CSR kernels), ``cpp`` (generated C++ kernels
on the CPU, compiled on first use; where they cannot build, cpu with one warning); ``auto`` picks triton
for CUDA tensors and cpp otherwise, and runs each program with the strategy tuned for it on the device
(``runtime.strategies``, ``runtime.tuner``: the backend's own kernels, PyTorch's CSR kernels or a dense GEMM).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.utils import _python_dispatch

from sparsec import config as settings
from sparsec.errors import SparsecError, SparsecWarning
from sparsec.formats import Layout, LayoutKey, layout_of_storage
from sparsec.runtime.cpp import (
    cpp_forward,
    cpp_forward_tiles,
    cpp_grad_input,
    cpp_grad_input_tiles,
    cpp_grad_values,
    cpp_problem,
    dots_read_tiles,
)
from sparsec.runtime.cpu import compute_dtype
from sparsec.runtime.plans import index_plan
from sparsec.runtime.strategies import DEFAULT, PROGRAMS, STRATEGIES, Strategy
from sparsec.runtime.tensor_state import tensor_state
from sparsec.runtime.tuner import choose


def backend_for(t: torch.Tensor, setting: str | None = None) -> str:
    """The backend that runs a call on ``t`` (``setting``: ``SPARSEC_BACKEND`` as already read)."""
    backend = settings.backend if setting is None else setting
    if backend == "auto":
        if t.is_cuda:
            return "triton"
        backend = "cpp"  # the generated CPU kernels beat PyTorch's CSR in every row of bench/test_cpu_layers.py
    if backend == "triton" and not t.is_cuda:
        raise SparsecError("SPARSEC_BACKEND=triton needs CUDA tensors; on a CPU use cpu or interpret")
    if backend == "interpret" and t.is_cuda:
        raise SparsecError("SPARSEC_BACKEND=interpret runs Triton's interpreter on CPU tensors; move them to the CPU")
    if backend == "cpp":
        if t.is_cuda:
            raise SparsecError("SPARSEC_BACKEND=cpp runs generated C++ kernels on CPU tensors; on CUDA use triton")
        problem = cpp_problem()
        if problem is not None:
            _warn_cpu_fallback(problem)
            return "cpu"
    return backend


@functools.cache
def _warn_cpu_fallback(problem: str) -> None:
    warnings.warn(
        f"the generated CPU kernels cannot run here ({problem}): sparse layers run on the cpu backend "
        f"(PyTorch's CSR kernels) instead",
        SparsecWarning,
        stacklevel=4,
    )


def strategy_for(
    program: str, key: LayoutKey, t: torch.Tensor, values: torch.Tensor, index, bias=None
) -> tuple[str, Strategy]:
    """The backend and the strategy of a program's call on ``t``: the tuned choice under
    ``SPARSEC_BACKEND=auto`` (``runtime.tuner.choose``), else the named backend's own strategy."""
    setting = settings.backend
    backend = backend_for(t, setting)
    if setting == "auto":
        return backend, choose(program, key, backend, values, t.shape[0], index, bias)
    return backend, STRATEGIES[DEFAULT[backend]]


_TAP_ATTR = "_sparsec_tap"


def set_tap(index: list[torch.Tensor], tap) -> None:
    """Hand every later ``spmm_grad_values`` on these index buffers its ``dY`` and ``X``:
    ``tap.observe(dy, x)`` (None: stop). Held on the first buffer, like the plan, so it belongs to the
    layer's storage (not pickled or deep-copied with it: ``tensor_state``); the layer sets it again when its
    buffers are replaced (``.to()``, a new layout)."""
    if tap is None:
        index[0].__dict__.pop(_TAP_ATTR, None)
    else:
        tensor_state(index[0], _TAP_ATTR)["tap"] = tap


def _hand_to_tap(index: list[torch.Tensor], dy: torch.Tensor, x: torch.Tensor) -> None:
    tap = index[0].__dict__.get(_TAP_ATTR, {}).get("tap")
    if tap is not None:
        dt = compute_dtype(dy)  # half types score in float32 on the CPU, as the cpu backend computes
        tap.observe(dy.detach().to(dt), x.detach().to(dt))


def spmm_eager(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    index: list[torch.Tensor],
    family: str,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """What ``sparsec::spmm`` computes, called without the op's dispatch: for eager calls that record
    no autograd graph and no trace (``eager_call_allowed`` and not ``records_graph``). A custom op's
    Python dispatch costs about 10 us, as long as the whole batch-1 product on a CPU."""
    key = _key(values, family, out_features, in_features)
    backend, strategy = strategy_for("forward", key, x, values, index, bias)
    plan = index_plan(key, strategy.plan_kind(backend), index)
    return strategy.forward(key, backend, plan, x, values, bias)


def eager_call_allowed(*tensors: torch.Tensor | None) -> bool:
    """True when a call on these tensors may skip the custom op: eager (not traced by dynamo or jit, no
    TorchFunctionMode or dispatch mode such as make_fx or FakeTensorMode to see it) and plain tensors (not
    subclasses, nor torch.func's vmap/grad wrappers, which look plain)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _python_dispatch._get_current_dispatch_mode():
        return False
    if torch._C._is_torch_function_mode_enabled():
        return False
    return all(t is None or (type(t) in _PLAIN and not _functorch_wrapped(t)) for t in tensors)


def records_graph(*tensors: torch.Tensor | None) -> bool:
    """True when autograd records a graph for a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


# The strategies eager training runs as they are: cpp, and cpp with grad_input's walk chosen (its backward asks
# the tuner's choice for the walk: ``_tuned_walk``)
_EAGER_STRATEGIES = ("cpp", "cpp-scatter", "cpp-transposed")


def trains_eagerly(x: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], layout_key: tuple) -> bool:
    """Whether eager training runs ``spmm_eager_training``: on the cpp backend, where every program's strategy
    is one of cpp's (a tuned choice of another strategy runs through the op)."""
    setting = settings.backend
    if backend_for(x, setting) != "cpp":
        return False
    if setting != "auto":
        return True
    key = _key(values, *layout_key)
    return all(choose(p, key, "cpp", values, x.shape[0], index).name in _EAGER_STRATEGIES for p in PROGRAMS)


def _tuned_walk(key: LayoutKey, values: torch.Tensor, batch: int, index: list[torch.Tensor]) -> str | None:
    """grad_input's walk for eager training: the tuned strategy's under ``SPARSEC_BACKEND=auto``, else the rule's."""
    if settings.backend != "auto":
        return None
    return getattr(choose("grad_input", key, "cpp", values, batch, index), "walk", None)


def spmm_eager_training(
    x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, index: list[torch.Tensor], layout_key: tuple
) -> torch.Tensor:
    """``sparsec::spmm`` with its backward, for eager training on the cpp backend (``eager_call_allowed``):
    an autograd Function that hands the forward's batch tiles of ``x``, and grad_input's of ``dy``, to the
    gradient dots through its ctx, where they cannot go stale (``config.cpp_keep_tiles``), and skips the
    custom op's dispatch. Traced and compiled code runs the op."""
    return _EagerTraining.apply(x, values, bias, index, *layout_key)


class _EagerTraining(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, index, family, out_features, in_features):
        key = _key(values, family, out_features, in_features)
        plan = index_plan(key, "cpp", index)
        # the tiles of x are held to the backward only where its values' dots read them
        keep = settings.cpp_keep_tiles and ctx.needs_input_grad[1] and dots_read_tiles(plan, values)
        y, x_tiles = cpp_forward_tiles(plan, x, values, bias) if keep else (cpp_forward(plan, x, values, bias), None)
        ctx.save_for_backward(x, values, *index)
        ctx.layout_key, ctx.key = key, LayoutKey(family, out_features, in_features)  # ctx.key: as the op's
        ctx.has_bias, ctx.x_tiles = bias is not None, x_tiles
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values, *index = ctx.saved_tensors
        x_tiles, ctx.x_tiles = ctx.x_tiles, None  # one backward reads them; a second one copies
        if torch.is_grad_enabled():  # create_graph: the op's backward, which autograd can see (or refuse)
            return (*_backward(ctx, dy)[:3], None, None, None, None)
        dy = dy.contiguous()
        plan = index_plan(ctx.layout_key, "cpp", index)
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        dx = dy_tiles = None
        walk = _tuned_walk(ctx.layout_key, values, dy.shape[0], index) if need_x else None
        if need_x and need_values and x_tiles is not None:
            dx, dy_tiles = cpp_grad_input_tiles(plan, dy, values, walk=walk)
        elif need_x:
            dx = cpp_grad_input(plan, dy, values, walk=walk)
        dv = None
        if need_values:
            _hand_to_tap(index, dy, x)
            dv = cpp_grad_values(plan, dy, x, values, dy_tiles, x_tiles)
        db = dy.sum(0) if ctx.has_bias and need_bias else None
        return dx, dv, db, None, None, None, None


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses: FakeTensor, FunctionalTensor, DTensor, ...


@torch.library.custom_op("sparsec::spmm", mutates_args=())
def spmm(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    index: list[torch.Tensor],
    family: str,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    return spmm_eager(x, values, bias, index, family, out_features, in_features)


@spmm.register_fake
def _(x, values, bias, index, family, out_features, in_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("sparsec::spmm_grad_input", mutates_args=())
def spmm_grad_input(
    dy: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], family: str, out_features: int, in_features: int
) -> torch.Tensor:
    key = _key(values, family, out_features, in_features)
    backend, strategy = strategy_for("grad_input", key, dy, values, index)
    return strategy.grad_input(key, backend, index_plan(key, strategy.plan_kind(backend), index), dy, values)


@spmm_grad_input.register_fake
def _(dy, values, index, family, out_features, in_features):
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("sparsec::spmm_grad_values", mutates_args=())
def spmm_grad_values(
    dy: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    index: list[torch.Tensor],
    family: str,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    key = _key(values, family, out_features, in_features)
    _hand_to_tap(index, dy, x)
    backend, strategy = strategy_for("grad_values", key, dy, values, index)
    return strategy.grad_values(key, backend, index_plan(key, strategy.plan_kind(backend), index), dy, x, values)


@spmm_grad_values.register_fake
def _(dy, x, values, index, family, out_features, in_features):
    return values.new_empty(values.shape)


def _key(values: torch.Tensor, family: str, out_features: int, in_features: int) -> LayoutKey:
    """The canonical layout key of the ops' arguments: the family's layout holding ``values``."""
    layout: Layout = layout_of_storage(family, out_features, in_features, values.numel())
    return layout.key


def _setup(ctx, inputs, output):
    x, values, bias, index, *key = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.key, ctx.has_bias = LayoutKey(*key), bias is not None


def _backward(ctx, dy):
    x, values, *index = ctx.saved_tensors
    dy = dy.contiguous()  # once for both gradients (sum()'s backward hands an expanded dy)
    dx = spmm_grad_input(dy, values, index, *ctx.key) if ctx.needs_input_grad[0] else None
    dv = spmm_grad_values(dy, x, values, index, *ctx.key) if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dv, db, [None] * len(index), None, None, None


spmm.register_autograd(_backward, setup_context=_setup)
