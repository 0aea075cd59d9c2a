"""Launchers: checks, output, grid and arguments of each generated kernel (kernel -> launcher -> autograd).

``Launcher.run(program, plan, **operands)`` binds the kernel's arguments by parameter name, as
Inductor binds a kernel signature. A tensor parameter is its operand's name in capitals (``x`` ->
``X``, ``dz`` -> ``DZ``, ``values`` -> ``VALUES``, ``bias`` -> ``BIAS``, ``drop`` -> ``DROP``, ``tiles`` ->
``TILES``, and the integers ``kc``, ``r0``, ``r1`` -> ``KC``, ``R0``, ``R1``); the new output is ``OUT``;
the sizes are ``B`` (batch rows), ``O`` and ``KIN`` (the layer's out and in features). The plan's index
tensors, the program's tile and the format strategy's ``call`` (grid, sizes, constexprs) supply the rest.
A grow_scores launch covers item-grid rows ``r0 .. r1`` (default: all), or, given ``tiles``, one
program per listed (row tile, column tile) pair, ``tiles [n, 2]`` (``LISTED``: the segment kernel's
second run).

Two tile constexprs shape the grid rather than a tile: ``GROUP`` > 1 launches a two-axis tile grid as one
axis walked GROUP tiles of its first axis at a time (``tl.swizzle2d``: inputs shared by neighbouring
programs stay in L2), and grad_values' ``SPLIT`` > 1 adds a grid axis over SPLIT shares of the batch, each
writing float32 partial sums ``[SPLIT, *values]`` that the launcher adds (split-batch: a layer whose
gradient has few tiles still fills the GPU on a long batch; deterministic, no atomics).

Operands are 2-D row-major tensors. With ``poison=True`` outputs start as NaN (grow keys as -2), so
an element a kernel forgets to write cannot pass a test by luck.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sparsec.codegen.cache import interpreting, load_kernel_module
from sparsec.errors import ShapeError, SparsecError
from sparsec.formats import Layout
from sparsec.runtime.compile import LayerKernels


@dataclass(frozen=True)
class LaunchConfig:
    """A tuned kernel configuration: tile constexprs over the program's defaults (``Strategy.tile_space``),
    and Triton's ``num_warps`` / ``num_stages`` (None: Triton's defaults)."""

    tile: tuple[tuple[str, int], ...] = ()
    num_warps: int | None = None
    num_stages: int | None = None

    def as_dict(self) -> dict:
        return {"tile": dict(self.tile), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @staticmethod
    def from_dict(d: Mapping) -> LaunchConfig:
        return LaunchConfig(tuple(sorted(d.get("tile", {}).items())), d.get("num_warps"), d.get("num_stages"))

    def text(self) -> str:
        parts = [f"{k}={v}" for k, v in self.tile]
        parts += [f"{name}={v}" for name, v in (("warps", self.num_warps), ("stages", self.num_stages)) if v]
        return ",".join(parts) or "defaults"

    def options(self) -> dict[str, int]:
        """The launch (and compile) options it sets."""
        return {k: v for k, v in (("num_warps", self.num_warps), ("num_stages", self.num_stages)) if v is not None}


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if tuple(t.shape) != shape:
        raise ShapeError(f"{name} has shape {tuple(t.shape)}; the kernel needs {shape}")
    if t.dtype != like.dtype or t.device != like.device:
        raise SparsecError(f"{name} is {t.dtype} on {t.device}; the layer is {like.dtype} on {like.device}")
    if not t.is_contiguous():
        raise SparsecError(f"{name} is not contiguous (strides {t.stride()}); call .contiguous() first")


def kernel_parameters(kernel) -> tuple[tuple[str, bool], ...]:
    """(name, is constexpr) of every parameter of a jit kernel, in signature order (the JIT function and
    the interpreter's function both keep the Python function as ``fn``)."""
    import triton.language as tl  # lazy: triton is optional (Linux only) and heavy; only launching needs it

    params = inspect.signature(kernel.fn).parameters.values()
    return tuple((p.name, p.annotation is tl.constexpr) for p in params)


MAX_GRID_X, MAX_GRID_Y = 2**31 - 1, 65535  # CUDA's limits on grid axes x and y (z: as y)


def launch_grid(grid: tuple[int, ...]) -> tuple[tuple[int, ...], dict[str, bool]]:
    """The grid a kernel launches with, and its ``SWAP`` constexpr.

    A strategy's grid may have two axes (batch tiles x output tiles, ...), and the second can pass CUDA's
    65,535 limit on axis y (a 128k-vocabulary head in 1x32 blocks, a million outputs in 16-row tiles):
    then the axes are swapped, and the kernel, compiled with ``SWAP=True``, reads them swapped (a
    constexpr: no instruction is added to the usual variant). A third axis (split-batch shares) stays z.
    """
    if len(grid) == 1:
        if grid[0] > MAX_GRID_X:
            raise SparsecError(f"a launch of {grid[0]} programs passes CUDA's {MAX_GRID_X} on grid axis x")
        return grid, {}
    first, second, *rest = grid
    swap = second > MAX_GRID_Y
    x, y = (second, first) if swap else (first, second)
    if x > MAX_GRID_X or y > MAX_GRID_Y or any(z > MAX_GRID_Y for z in rest):
        raise SparsecError(
            f"a launch of {' x '.join(map(str, grid))} programs does not fit CUDA's grid "
            f"({MAX_GRID_X} x {MAX_GRID_Y} x {MAX_GRID_Y}); split the batch into smaller calls"
        )
    return (x, y, *rest), {"SWAP": swap}


def batch_split(program: str, tile: Mapping[str, int]) -> int:
    """The number of batch shares a launch of ``program`` at ``tile`` sums separately (1: none)."""
    return tile.get("SPLIT", 1) if program == "grad_values" else 1


def tile_grid(grid: tuple[int, ...], tile: Mapping[str, int], split: int) -> tuple[int, ...]:
    """A strategy's tile grid as launched: flattened to one axis where the tile groups it (the second axis
    kept, of one program, so a split axis stays where the kernel reads it), the split axis appended."""
    if tile.get("GROUP", 1) > 1 and len(grid) == 2:
        grid = (grid[0] * grid[1], 1)
    return (*grid, split) if split > 1 else grid


def device_guard(device: torch.device):
    """Make ``device`` current while a kernel launches: Triton launches on the current CUDA device, so a
    layer on ``cuda:1`` (model parallel, ``device_map``) would otherwise run on device 0 with device-1
    pointers. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class Launcher:
    """Launches one layer's kernels; ``interpret`` runs them in Triton's interpreter (CPU)."""

    def __init__(self, kernels: LayerKernels, layout: Layout, interpret: bool, poison: bool = False):
        if interpret and not interpreting():
            raise SparsecError(
                "the interpret backend needs TRITON_INTERPRET=1 in the environment before triton is imported "
                "(start the process with it set)"
            )
        self.kernels, self.layout, self.poison = kernels, layout, poison
        self.strategy = layout.format.strategy(layout.spec)
        self._parameters: dict[str, tuple[tuple[str, bool], ...]] = {}

    def tile(self, program: str, config: LaunchConfig | None = None) -> dict[str, int]:
        """The program's tile: its defaults, with ``config``'s sizes over them."""
        tile = self.kernels.kernels[program].tile
        if config is None or not config.tile:
            return tile
        unknown = dict(config.tile).keys() - tile.keys()
        if unknown:
            raise SparsecError(f"{program} has no tile sizes {sorted(unknown)}; its tile is {sorted(tile)}")
        return {**tile, **dict(config.tile)}

    def plan(self, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The index plan the kernels read for these index buffers (``runtime.ops.index_plan`` caches it)."""
        return self.strategy.plan(self.layout, buffers)

    def grow_segment(self) -> int | None:
        """Width of the segments grow_scores keeps candidates of; None when it scores whole items (blocks)."""
        return self.strategy.grow_segment(self.tile("grow_scores"))

    def run(
        self, program: str, plan: Mapping[str, torch.Tensor], config: LaunchConfig | None = None, **operands
    ) -> torch.Tensor:
        """Run ``program``'s kernel on its operands (``x``, ``dz``, ``values``, ``bias``, ``drop``, ``kc``,
        ``r0``, ``r1``, ``tiles``), at ``config`` (a tuned configuration; None: the defaults); returns its
        new output: ``Y``, ``dX``, ``dV``, or the grow scores (``Strategy.grow_output``)."""
        lay = self.layout
        x, dz, values = operands.get("x"), operands.get("dz"), operands.get("values")
        like = values if values is not None else x
        batch = (dz if dz is not None else x).shape[0]
        if dz is not None:
            _check("dz", dz, (batch, lay.out_features), like)
        if x is not None:
            _check("x", x, (batch, lay.in_features), like)
        tile = self.tile(program, config)
        rows = listed = None  # grow_scores: rows of the launch; tiles listed (the second run), or None
        if program == "grow_scores":
            operands = {"r0": 0, "r1": lay.grid[0], **operands}
            rows = operands["r1"] - operands["r0"]
            if not 0 <= operands["r0"] <= operands["r1"] <= lay.grid[0]:
                raise SparsecError(f"grow_scores rows {operands['r0']}..{operands['r1']} are outside 0..{lay.grid[0]}")
            listed = None if operands.get("tiles") is None else operands["tiles"].shape[0]
            shape, dtype, poison = self.strategy.grow_output(lay, tile, operands.get("kc", 0), rows, listed)
        else:
            outputs = {"forward": (batch, lay.out_features), "grad_input": (batch, lay.in_features)}
            outputs["grad_values"] = lay.values_shape
            shape, dtype, poison = outputs[program], like.dtype, float("nan")
        split = batch_split(program, tile)
        partial = (split, *shape) if split > 1 else shape  # float32 partial sums, added below
        out = torch.empty(partial, dtype=torch.float32 if split > 1 else dtype, device=like.device)
        if self.poison:
            out.fill_(poison)
        call = self.strategy.call(program, lay, tile, plan, batch, rows)
        call = dataclasses.replace(call, grid=tile_grid((listed,) if listed is not None else call.grid, tile, split))
        if program == "grow_scores":
            if listed is None:
                operands["tiles"] = torch.empty(0, dtype=torch.int32, device=like.device)  # never read
            operands["listed"] = listed is not None
        own = {name.upper(): value for name, value in operands.items() if value is not None}
        own.update(B=batch, O=lay.out_features, KIN=lay.in_features, OUT=out, PART=math.prod(shape))
        if values is not None:
            own.setdefault("BIAS", values)  # a kernel reads BIAS only when rendered with bias=True
        # call.args after the tile: a strategy may bind a tile's name to another value (block sides)
        named = {**plan, **tile, **call.args}
        assert not named.keys() & own.keys(), f"{program}: the format rebinds {sorted(named.keys() & own.keys())}"
        grid, flat = launch_grid(call.grid)
        flat.setdefault("SWAP", False)
        self._bind(program, grid, {**named, **own, **flat}, config.options() if config is not None else {})
        return out.sum(0, dtype=torch.float32).to(dtype) if split > 1 else out

    def _bind(self, program: str, grid: tuple[int, ...], named: dict[str, object], options: dict) -> None:
        if program not in self._parameters:
            self._parameters[program] = kernel_parameters(self._kernel(program))
        params = self._parameters[program]
        missing = [name for name, _ in params if name not in named]
        assert not missing, f"{program}: nothing to bind to kernel parameters {missing}; have {sorted(named)}"
        args = {name: named[name] for name, constexpr in params if not constexpr}
        constexprs = {name: named[name] for name, constexpr in params if constexpr}
        self._launch(program, grid, args, constexprs, options)

    def _kernel(self, program: str):
        return load_kernel_module(self.kernels.kernels[program].source).kernel

    def _launch(self, program: str, grid: tuple[int, ...], args: dict[str, object], constexprs: dict, options: dict):
        """The one place a kernel runs, every argument by name: ``args`` (tensors and sizes, in signature
        order), ``constexprs`` and the launch ``options`` (num_warps, num_stages), on the device of its output.
        The AOT recorder overrides this to record the call instead."""
        with device_guard(args["OUT"].device):
            self._kernel(program)[grid](**args, **constexprs, **options)


__all__ = [
    "MAX_GRID_X",
    "MAX_GRID_Y",
    "LaunchConfig",
    "Launcher",
    "batch_split",
    "kernel_parameters",
    "launch_grid",
    "tile_grid",
]
