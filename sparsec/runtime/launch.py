"""Launchers: checks, grids and arguments for each generated kernel (kernel -> launcher -> autograd).

Every launcher takes 2-D row-major tensors and returns a new output. With ``poison=True`` outputs
start as NaN, so an element a kernel forgets to write cannot pass a test by luck.
"""

from __future__ import annotations

import torch

from sparsec.codegen.cache import interpreting, load_kernel_module
from sparsec.errors import ShapeError, SparsecError
from sparsec.formats import Layout
from sparsec.runtime.compile import LayerKernels
from sparsec.runtime.plan import TritonPlan
from sparsec.spec import NM, parse_spec


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _new(shape, like: torch.Tensor, poison: bool) -> torch.Tensor:
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    return out.fill_(float("nan")) if poison else out


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if tuple(t.shape) != shape:
        raise ShapeError(f"{name} has shape {tuple(t.shape)}; the kernel needs {shape}")
    if t.dtype != like.dtype or t.device != like.device:
        raise SparsecError(f"{name} is {t.dtype} on {t.device}; the layer is {like.dtype} on {like.device}")
    if not t.is_contiguous():
        raise SparsecError(f"{name} is not contiguous (strides {t.stride()}); call .contiguous() first")


class Launcher:
    """Launches one layer's kernels; ``interpret`` runs them in Triton's interpreter (CPU)."""

    def __init__(self, kernels: LayerKernels, layout: Layout, interpret: bool, poison: bool = False):
        if interpret and not interpreting():
            raise SparsecError(
                "the interpret backend needs TRITON_INTERPRET=1 in the environment before triton is imported "
                "(start the process with it set)"
            )
        self.kernels, self.layout, self.poison = kernels, layout, poison
        self.spec = parse_spec(kernels.spec)

    def _launch(self, program: str, grid: tuple[int, ...], *args, **constexprs) -> None:
        kernel = load_kernel_module(self.kernels.kernels[program].source).kernel
        kernel[grid](*args, **constexprs)

    def _tile(self, program: str) -> dict[str, int]:
        return self.kernels.kernels[program].tile

    def _block_sides(self) -> dict[str, int]:
        t = self._tile("forward")
        return {"BH": self.spec.rows, "BW": self.spec.cols, "BH_P": t["BH"], "BW_P": t["BW"]}

    def forward(
        self,
        x: torch.Tensor,
        values: torch.Tensor,
        plan: TritonPlan,
        positions: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        lay, strategy = self.layout, self.kernels.strategy
        b = x.shape[0]
        _check("x", x, (b, lay.in_features), values)
        y = _new((b, lay.out_features), x, self.poison)
        t = self._tile("forward")
        bias_arg = bias if bias is not None else values
        if strategy == "decompress-dot":
            grid = (cdiv(b, t["BLOCK_B"]), cdiv(lay.out_features, t["BLOCK_O"]))
            self._launch(
                "forward",
                grid,
                x,
                values,
                positions,
                bias_arg,
                y,
                b,
                lay.out_features,
                lay.in_features,
                N=self.spec.n,
                M=self.spec.m,
                **t,
            )
        elif strategy == "block-dot":
            grid = (cdiv(b, t["BLOCK_B"]), lay.grid[0])
            self._launch(
                "forward",
                grid,
                x,
                plan.ptr,
                plan.idx,
                plan.idx,
                values,
                bias_arg,
                y,
                b,
                lay.in_features,
                lay.out_features,
                BLOCK_B=t["BLOCK_B"],
                **self._block_sides(),
            )
        else:
            grid = (cdiv(b, t["BLOCK_B"]), cdiv(lay.out_features, t["BLOCK_O"]))
            self._launch(
                "forward",
                grid,
                x,
                plan.ptr,
                plan.idx,
                values,
                plan.idx,
                bias_arg,
                y,
                b,
                lay.out_features,
                lay.in_features,
                **t,
            )
        return y

    def grad_input(
        self, dz: torch.Tensor, values: torch.Tensor, plan: TritonPlan, positions: torch.Tensor | None
    ) -> torch.Tensor:
        lay, strategy = self.layout, self.kernels.strategy
        b = dz.shape[0]
        _check("dz", dz, (b, lay.out_features), values)
        dx = _new((b, lay.in_features), dz, self.poison)
        t = self._tile("grad_input")
        if strategy == "decompress-dot":
            grid = (cdiv(b, t["BLOCK_B"]), cdiv(lay.in_features, t["BLOCK_K"]))
            self._launch(
                "grad_input",
                grid,
                dz,
                values,
                positions,
                dx,
                b,
                lay.out_features,
                lay.in_features,
                N=self.spec.n,
                M=self.spec.m,
                **t,
            )
        elif strategy == "block-dot":
            grid = (cdiv(b, t["BLOCK_B"]), lay.grid[1])
            self._launch(
                "grad_input",
                grid,
                dz,
                plan.ptr_t,
                plan.idx_t,
                plan.perm_t,
                values,
                values,
                dx,
                b,
                lay.out_features,
                lay.in_features,
                BLOCK_B=t["BLOCK_B"],
                **self._block_sides(),
            )
        else:
            grid = (cdiv(b, t["BLOCK_B"]), cdiv(lay.in_features, t["BLOCK_O"]))
            self._launch(
                "grad_input",
                grid,
                dz,
                plan.ptr_t,
                plan.idx_t,
                values,
                plan.perm_t,
                values,
                dx,
                b,
                lay.in_features,
                lay.out_features,
                **t,
            )
        return dx

    def grad_values(
        self, dz: torch.Tensor, x: torch.Tensor, values: torch.Tensor, plan: TritonPlan, positions: torch.Tensor | None
    ) -> torch.Tensor:
        lay, strategy = self.layout, self.kernels.strategy
        b = dz.shape[0]
        _check("dz", dz, (b, lay.out_features), values)
        _check("x", x, (b, lay.in_features), values)
        dv = _new(lay.values_shape, values, self.poison)
        t = self._tile("grad_values")
        if strategy == "decompress-dot":
            grid = (cdiv(lay.out_features, t["BLOCK_O"]), cdiv(lay.in_features, t["BLOCK_K"]))
            self._launch(
                "grad_values",
                grid,
                dz,
                x,
                positions,
                dv,
                b,
                lay.out_features,
                lay.in_features,
                N=self.spec.n,
                M=self.spec.m,
                **t,
            )
        elif strategy == "block-dot":
            self._launch(
                "grad_values",
                (lay.n_items,),
                dz,
                x,
                plan.rows,
                plan.idx,
                dv,
                b,
                lay.out_features,
                lay.in_features,
                BLOCK_B=t["BLOCK_B"],
                **self._block_sides(),
            )
        else:
            grid = (cdiv(lay.nnz, t["BLOCK_E"]),)
            self._launch(
                "grad_values", grid, dz, x, plan.rows, plan.idx, dv, b, lay.out_features, lay.in_features, lay.nnz, **t
            )
        return dv

    def grow_scores(
        self,
        dz: torch.Tensor,
        x: torch.Tensor,
        plan: TritonPlan,
        positions: torch.Tensor | None,
        dropped: torch.Tensor,
        kc: int,
    ) -> torch.Tensor:
        """Block formats: mean |dZ^T X| per block of the block grid. Others: int64 keys [O, segments, kc]
        of the kc best positions of every segment outside the positions kept after the drop."""
        lay, strategy = self.layout, self.kernels.strategy
        b = dz.shape[0]
        _check("dz", dz, (b, lay.out_features), x)
        t = self._tile("grow_scores")
        if strategy == "block-dot":
            scores = torch.full(lay.grid, float("nan") if self.poison else 0.0, dtype=torch.float32, device=dz.device)
            sides = {"BH": self.spec.rows, "BW": self.spec.cols, "BH_P": t["BH"], "BW_P": t["BW"]}
            self._launch(
                "grow_scores",
                lay.grid,
                dz,
                x,
                scores,
                b,
                lay.out_features,
                lay.in_features,
                BLOCK_B=t["BLOCK_B"],
                **sides,
            )
            return scores
        nm = strategy == "decompress-dot"
        seg = self.spec.m if nm else t["BLOCK_K"]
        nseg = cdiv(lay.in_features, seg)
        keys = torch.empty((lay.out_features, nseg, kc), dtype=torch.int64, device=dz.device)
        if self.poison:
            keys.fill_(-2)  # neither a key (>= 0) nor the kernel's empty place (-1)
        grid = (cdiv(lay.out_features, t["BLOCK_O"]), cdiv(lay.in_features, t["BLOCK_K"]))
        tiles = {k: t[k] for k in ("BLOCK_B", "BLOCK_O", "BLOCK_K")}
        if nm:
            self._launch(
                "grow_scores",
                grid,
                dz,
                x,
                positions,
                dropped,
                keys,
                b,
                lay.out_features,
                lay.in_features,
                SEG=seg,
                KC=kc,
                N=self.spec.n,
                M=self.spec.m,
                **tiles,
            )
        else:
            longest = int((plan.ptr[1:] - plan.ptr[:-1]).max()) if lay.out_features else 0
            self._launch(
                "grow_scores",
                grid,
                dz,
                x,
                plan.ptr,
                plan.idx,
                dropped,
                keys,
                b,
                lay.out_features,
                lay.in_features,
                SEG=seg,
                KC=kc,
                SEARCH_STEPS=longest.bit_length() + 1,
                **tiles,
            )
        return keys


def positions_of(spec, buffers: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The tensor N:M kernels read directly (positions in group); None for other formats."""
    return buffers["nm_positions"] if isinstance(spec, NM) else None


__all__ = ["Launcher", "positions_of"]
