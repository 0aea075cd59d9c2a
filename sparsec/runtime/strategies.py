"""The ways a layer's program can run, per device: what the tuner chooses between and the ops run.

Each ``Strategy`` computes ``forward`` (``x @ W^T + bias``), ``grad_input`` (``dy @ W``) and ``grad_values``
(``dy^T @ x`` at the kept positions, in stored order) from the index plan it reads (``plan_kind``):

- ``cpp``: sparsec's generated C++ kernels (CPU); ``cpp-rows``: the same on a block layer's rows instead of
  micro-tiles on its blocks (faster for some block sizes, batches and programs: the tuner times both);
  ``cpp-scatter`` and ``cpp-transposed``: ``grad_input`` of a layer of single weights scattered through W's
  rows, or walked along W^T's, where ``cpp`` chooses by a measured rule (``runtime.cpp.scatters_grad_input``);
- ``triton``: sparsec's generated Triton kernels (CUDA; ``interpret``: the same in Triton's interpreter);
- ``torch-csr``: PyTorch's CSR kernels (MKL on a CPU, cuSPARSE on a GPU);
- ``dense``: the layer's weight decompressed for the call (one layer's, freed after it: the model stays
  compressed) and a dense GEMM (BLAS, cuBLAS); its values gradient is the dense ``dy^T @ x`` sampled;
- ``semi-structured``: a 2:4 layer's forward on the GPU's sparse tensor cores (PyTorch's semi-structured
  tensors), compressed for the call.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.sparse import to_sparse_semi_structured

from sparsec.dtypes import KERNEL_TORCH_DTYPES
from sparsec.dtypes import name_of as dtype_name
from sparsec.errors import SparsecError
from sparsec.formats import LayoutKey, layout_of
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.cpp import (
    KERNEL_TYPES,
    CppPlan,
    cpp_densify,
    cpp_forward,
    cpp_grad_input,
    cpp_grad_values,
    cpp_problem,
    cpp_sample,
)
from sparsec.runtime.cpu import CSRPlan, compute_dtype, csr_forward, csr_grad_input, csr_grad_values
from sparsec.runtime.launch import LaunchConfig, Launcher

PROGRAMS = ("forward", "grad_input", "grad_values")


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


@dataclass(frozen=True)
class Strategy:
    """One way of running a layer's programs; ``plan_kind`` names the index plan it reads
    (``runtime.plans.index_plan``'s kind)."""

    name: str
    devices: tuple[str, ...]  # device types it runs on

    @property
    def config(self) -> LaunchConfig | None:
        """Its kernel configuration (None: it has none, or runs its defaults)."""
        return None

    @property
    def label(self) -> str:
        """Its name, with its configuration where it has one (the tuner's reports and timings)."""
        return self.name if self.config is None else f"{self.name}[{self.config.text()}]"

    def with_config(self, config: LaunchConfig | None) -> Strategy:
        return self

    def plan_kind(self, backend: str) -> str:
        return backend

    def problem(self, device_type: str) -> str | None:
        """Why it cannot run on this device here (None: it can)."""
        return None if device_type in self.devices else f"{self.name} runs on {', '.join(self.devices)}"

    def fits(self, program: str, key: LayoutKey, values: torch.Tensor) -> str | None:
        """Why it cannot run this program of this layer (None: it can)."""
        return None

    def forward(self, key, backend, plan, x, values, bias):
        raise NotImplementedError

    def grad_input(self, key, backend, plan, dy, values):
        raise NotImplementedError

    def grad_values(self, key, backend, plan, dy, x, values):
        raise NotImplementedError


@dataclass(frozen=True)
class Cpp(Strategy):
    micro_tiles: bool = True  # block layers: micro-tiles on the blocks (False: their rows, as other layers)
    walk: str | None = None  # grad_input: "rows" (scatter) or "columns" (W^T) of single weights; None: the rule

    def plan_kind(self, backend):
        return "cpp"

    def problem(self, device_type):
        return super().problem(device_type) or cpp_problem()

    def fits(self, program, key, values):
        single = layout_of(*key).item == (1, 1)
        if not self.micro_tiles and single:  # items of one weight: no blocks
            return f"{self.name} differs from cpp on block layers only; this one is {key.spec}"
        if self.walk is not None and (program != "grad_input" or not single):
            return f"{self.name} differs from cpp in grad_input of layers of single weights only"
        return None

    def forward(self, key, backend, plan, x, values, bias):
        return cpp_forward(plan, x, values, bias, self.micro_tiles)

    def grad_input(self, key, backend, plan, dy, values):
        return cpp_grad_input(plan, dy, values, self.micro_tiles, self.walk)

    def grad_values(self, key, backend, plan, dy, x, values):
        return cpp_grad_values(plan, dy, x, values, micro_tiles=self.micro_tiles)


@dataclass(frozen=True)
class Triton(Strategy):  # the plan of the backend it runs under: triton, or interpret
    launch: LaunchConfig | None = None  # a tuned configuration of its kernels (None: the defaults)

    @property
    def config(self):
        return self.launch

    def with_config(self, config):
        return dataclasses.replace(self, launch=config)

    def forward(self, key, backend, plan, x, values, bias):
        launcher = kernel_launcher(key, values, bias is not None, backend)
        return launcher.run("forward", plan, self.launch, x=x.contiguous(), values=values, bias=bias)

    def grad_input(self, key, backend, plan, dy, values):
        launcher = kernel_launcher(key, values, False, backend)
        return launcher.run("grad_input", plan, self.launch, dz=dy.contiguous(), values=values)

    def grad_values(self, key, backend, plan, dy, x, values):
        launcher = kernel_launcher(key, values, False, backend)
        return launcher.run("grad_values", plan, self.launch, dz=dy.contiguous(), x=x.contiguous(), values=values)


class TorchCSR(Strategy):
    def plan_kind(self, backend):
        return "cpu"

    def forward(self, key, backend, plan, x, values, bias):
        y = csr_forward(plan, x, values)
        return y if bias is None else y + bias

    def grad_input(self, key, backend, plan, dy, values):
        return csr_grad_input(plan, dy, values)

    def grad_values(self, key, backend, plan, dy, x, values):
        return csr_grad_values(plan, dy, x, values)


class Dense(Strategy):
    def plan_kind(self, backend):
        # the rows the generated C++ kernels decompress from and sample into; elsewhere PyTorch's CSR
        return "cpp" if backend == "cpp" else "cpu"

    def forward(self, key, backend, plan, x, values, bias):
        return _dense(plan, values, x.dtype, lambda w: F.linear(x, w, bias))

    def grad_input(self, key, backend, plan, dy, values):
        return _dense(plan, values, dy.dtype, lambda w: dy @ w)

    def grad_values(self, key, backend, plan, dy, x, values):
        if isinstance(plan, CppPlan):
            with torch.autocast(dy.device.type, enabled=False):
                full = (
                    dy.t() @ x
                    if dy.dtype not in KERNEL_TYPES
                    else torch.matmul(dy.t(), x, out=_workspace(plan.shape, dy.dtype))
                )
                return cpp_sample(plan, full, values)
        return _dense_sampled(plan, dy, x, values)


_workspaces = threading.local()


def _workspace(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU buffer of one layer's dense weight, reused by the dense strategy's calls on this thread (the
    largest layer's size, one per dtype; never one per layer): a fresh 32 MB buffer costs its page faults
    on every call, 9.5 ms on this project's CPU, about as much as the GEMM it feeds."""
    held = getattr(_workspaces, "buffers", None)
    if held is None:
        held = _workspaces.buffers = {}
    n = shape[0] * shape[1]
    buf = held.get(dtype)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a buffer made in inference mode could not be written outside it
            buf = held[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


class SemiStructured(Strategy):
    """PyTorch's semi-structured 2:4 product on the GPU's sparse tensor cores (cuSPARSELt or CUTLASS), for the
    forward of a 2:4 layer: the weight is compressed for the call from the layer's values (as dense
    decompresses it; the tuner's time includes the compression)."""

    def plan_kind(self, backend):
        return "cpu"  # the CSR structures: the dense weight it compresses is built from them

    def problem(self, device_type):
        found = super().problem(device_type)
        if found is not None:
            return found
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
            return "semi-structured sparsity needs sparse tensor cores (compute capability 8.0 or newer)"
        return None

    def fits(self, program, key, values):
        if program != "forward":
            return f"{self.name} runs the forward only (PyTorch's semi-structured tensors have no {program} here)"
        if key.spec != "2:4":
            return f"{self.name} runs 2:4 layers; this one is {key.spec}"
        if values.dtype not in (torch.float16, torch.bfloat16):
            return f"{self.name} runs fp16 and bf16 here; this layer is {values.dtype}"
        if key.out_features % 64 or key.in_features % 64:
            return (
                f"{self.name} needs both weight sides multiples of 64; this one is {key.out_features}x{key.in_features}"
            )
        return None

    def forward(self, key, backend, plan, x, values, bias):
        with torch.autocast(values.device.type, enabled=False):
            w = plan.weight(values).to_dense().to(x.dtype)
            return F.linear(x.contiguous(), to_sparse_semi_structured(w), bias)


STRATEGIES = {
    s.name: s
    for s in (
        Cpp("cpp", ("cpu",)),
        Cpp("cpp-rows", ("cpu",), micro_tiles=False),
        Cpp("cpp-scatter", ("cpu",), walk="rows"),
        Cpp("cpp-transposed", ("cpu",), walk="columns"),
        Triton("triton", ("cuda",)),
        TorchCSR("torch-csr", ("cpu", "cuda")),
        Dense("dense", ("cpu", "cuda")),
        SemiStructured("semi-structured", ("cuda",)),
    )
}
DEFAULT = {"cpp": "cpp", "cpu": "torch-csr", "triton": "triton", "interpret": "triton"}  # backend -> strategy


def _dense(plan: CSRPlan | CppPlan, values: torch.Tensor, dtype: torch.dtype, product) -> torch.Tensor:
    """``product(W)`` for this call's dense ``W`` (built, used, freed)."""
    with torch.autocast(values.device.type, enabled=False):
        if isinstance(plan, CppPlan):  # the result of product never aliases W, so the workspace is free after it
            reused = _workspace(plan.shape, dtype) if dtype in KERNEL_TYPES else None  # fp16: through fp32
            return product(cpp_densify(plan, values, dtype, reused))
        return product(plan.weight(values.to(compute_dtype(values))).to_dense().to(dtype))


def _dense_sampled(plan: CSRPlan, dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    with torch.autocast(dy.device.type, enabled=False):
        full = dy.t() @ x  # [out, in], for this call only
        rows = torch.repeat_interleave(torch.arange(plan.shape[0], device=dy.device), plan.crow.diff())
        sampled = full[rows, plan.col]  # CSR order
        if plan.order is not None:
            out = torch.empty_like(sampled)
            out[plan.order] = sampled
            sampled = out
        return sampled.view(values.shape).to(values.dtype)
