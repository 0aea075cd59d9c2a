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
for CUDA tensors and cpp otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref

import torch
from torch.utils import _python_dispatch

from sparsec import config as settings
from sparsec.dtypes import KERNEL_TORCH_DTYPES
from sparsec.dtypes import name_of as dtype_name
from sparsec.errors import SparsecError, SparsecWarning
from sparsec.formats import Layout, LayoutKey, layout_of, layout_of_storage
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.cpp import (
    CppPlan,
    cpp_forward,
    cpp_forward_tiles,
    cpp_grad_input,
    cpp_grad_input_tiles,
    cpp_grad_values,
    cpp_problem,
    dots_read_tiles,
)
from sparsec.runtime.cpu import CSRPlan, compute_dtype, csr_forward, csr_grad_input, csr_grad_values
from sparsec.runtime.launch import Launcher


def backend_for(t: torch.Tensor) -> str:
    backend = settings.backend
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


def index_plan(key: LayoutKey, backend: str, index: list[torch.Tensor]):
    """The index plan for these buffers: the CSR structures of the cpu backend, or the tensors the format's
    kernels read.

    The plan is kept on the first index buffer, so it belongs to the layer: freed with its buffers, never
    confused with another tensor that reuses an address. An in-place mask change (a new ``_version``)
    rebuilds it into the same plan tensors where the shapes allow (they do for one layout), so a CUDA
    graph captured before an update reads the new mask when it replays.
    """
    anchor = index[0]
    versions = tuple(t._version for t in index)
    held: _HeldPlan | None = getattr(anchor, _PLAN_ATTR, None)
    if held is not None and held.serves(key, backend, index):
        if held.versions != versions:
            held.plan, held.versions = _refill(held.plan, _build_plan(key, backend, index)), versions
        return held.plan
    held = _HeldPlan(key, backend, [weakref.ref(t) for t in index], versions, _build_plan(key, backend, index))
    setattr(anchor, _PLAN_ATTR, held)
    return held.plan


_PLAN_ATTR = "_sparsec_plan"


def refresh_plan(index: list[torch.Tensor]) -> None:
    """Rebuild the plan held on these index buffers now, in place, after their contents changed.

    Called where a mask is written: a CUDA graph replays its kernels without running Python, so the
    plan its kernels read must hold the new mask before the next replay, not at the next eager call.
    Nothing is held (no call has run yet): nothing to do.
    """
    held: _HeldPlan | None = getattr(index[0], _PLAN_ATTR, None)
    if held is not None and held.serves(held.key, held.backend, index):
        index_plan(held.key, held.backend, index)


@dataclasses.dataclass
class _HeldPlan:
    key: LayoutKey
    backend: str
    index: list[weakref.ref]  # weak: the plan hangs on index[0] and must not keep the others alive
    versions: tuple[int, ...]
    plan: object

    def serves(self, key: LayoutKey, backend: str, index: list[torch.Tensor]) -> bool:
        same = len(self.index) == len(index) and all(r() is t for r, t in zip(self.index, index, strict=False))
        return same and (self.key, self.backend) == (key, backend)


def _build_plan(key: LayoutKey, backend: str, index: list[torch.Tensor]):
    layout = layout_of(*key)
    buffers = {name: t for (name, _, _), t in zip(layout.buffers, index, strict=True)}
    if backend == "cpu":
        return CSRPlan.build(layout, layout.decode(buffers))
    if backend == "cpp":
        items = layout.decode(buffers)
        return CppPlan.build(CSRPlan.build(layout, items), layout, items)
    return layout.format.strategy(layout.spec).plan(layout, buffers)


def _plan_tensors(plan) -> dict[str, torch.Tensor | None]:
    if isinstance(plan, dict):
        return plan
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}


def _refill(old, new):
    """``old`` with ``new``'s contents copied into its tensors when every tensor matches in shape and dtype
    (the plan's storage stays where a captured graph reads it); else ``new``."""
    a, b = _plan_tensors(old), _plan_tensors(new)
    matches = a.keys() == b.keys() and all(
        (x is None and y is None)
        or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype)
        or (not isinstance(x, torch.Tensor) and x == y)
        for x, y in ((a[k], b[k]) for k in a)
    )
    if not matches:
        return new
    for k, x in a.items():
        if isinstance(x, torch.Tensor):
            x.copy_(b[k])
    return old


_TAP_ATTR = "_sparsec_tap"


def set_tap(index: list[torch.Tensor], tap) -> None:
    """Hand every later ``spmm_grad_values`` on these index buffers its ``dY`` and ``X``:
    ``tap.observe(dy, x)`` (None: stop). Held on the first buffer, like the plan, so it belongs to the
    layer's storage; the layer sets it again when its buffers are replaced (``.to()``, a new layout)."""
    if tap is None:
        index[0].__dict__.pop(_TAP_ATTR, None)
    else:
        setattr(index[0], _TAP_ATTR, tap)


def _hand_to_tap(index: list[torch.Tensor], dy: torch.Tensor, x: torch.Tensor) -> None:
    tap = getattr(index[0], _TAP_ATTR, None)
    if tap is not None:
        dt = compute_dtype(dy)  # half types score in float32 on the CPU, as the cpu backend computes
        tap.observe(dy.detach().to(dt), x.detach().to(dt))


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
    backend = backend_for(x)
    plan = index_plan(key, backend, index)
    if backend == "cpu":
        y = csr_forward(plan, x, values)
        return y if bias is None else y + bias
    if backend == "cpp":
        return cpp_forward(plan, x, values, bias)
    launcher = kernel_launcher(key, values, bias is not None, backend)
    return launcher.run("forward", plan, x=x.contiguous(), values=values, bias=bias)


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
        if need_x and need_values and x_tiles is not None:
            dx, dy_tiles = cpp_grad_input_tiles(plan, dy, values)
        elif need_x:
            dx = cpp_grad_input(plan, dy, values)
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
    backend = backend_for(dy)
    plan = index_plan(key, backend, index)
    if backend == "cpu":
        return csr_grad_input(plan, dy, values)
    if backend == "cpp":
        return cpp_grad_input(plan, dy, values)
    return kernel_launcher(key, values, False, backend).run("grad_input", plan, dz=dy.contiguous(), values=values)


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
    backend = backend_for(dy)
    plan = index_plan(key, backend, index)
    if backend == "cpu":
        return csr_grad_values(plan, dy, x, values)
    if backend == "cpp":
        return cpp_grad_values(plan, dy, x, values)
    launcher = kernel_launcher(key, values, False, backend)
    return launcher.run("grad_values", plan, dz=dy.contiguous(), x=x.contiguous(), values=values)


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
