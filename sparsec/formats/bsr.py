"""Block sparsity in BSR: ``values [nblocks, bh, bw]``, ``block_row_offsets`` and ``block_cols`` (int32).

Items are whole ``bh x bw`` blocks on the block grid. Every kept block is one ``tl.dot``
(``BlockDot``); the grow step scores every block of the grid by its mean ``|dY^T X|``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsec.errors import ShapeError, SparsecError
from sparsec.formats.base import (
    SYM,
    Format,
    KernelCall,
    Layout,
    Strategy,
    cdiv,
    decode_rows,
    divisors,
    encode_rows,
    kept_count,
    kept_expr,
    pow2_at_least,
)
from sparsec.lazy import lazy_module
from sparsec.spec.specs import Block, unstructured_with

sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec


@dataclass(frozen=True)
class BlockDot(Strategy):
    """A program walks a block row (a block column for ``dX``): one ``tl.dot`` per block."""

    name = "block-dot"
    templates = {
        "forward": ("bsr_spmm.py.jinja", {"transposed": False}),
        "grad_input": ("bsr_spmm.py.jinja", {"transposed": True, "bias": False, "activation": None}),
        "grad_values": ("bsr_sddmm.py.jinja", {}),
        "grow_scores": ("bsr_grow.py.jinja", {}),
    }
    rows: int
    cols: int

    def padding(self, tile: dict[str, int]) -> float:
        # blocks are padded to powers of two of at least 16 for tl.dot: block(3x3) runs 16x16 products
        return tile["BH"] * tile["BW"] / (self.rows * self.cols) if "BH" in tile else 1.0

    def tiles(self, program: str, dtype: str) -> dict[str, int]:
        # Block sides padded to powers of two of at least 16 for tl.dot; a 64-row tile lets sm_90a use
        # wgmma on tensor-core dots, 32 keeps IEEE fp32 dots (FMA units) within registers.
        half = self.precision(program, dtype) == "tensor"
        return {"BLOCK_B": 64 if half else 32, "BH": pow2_at_least(self.rows), "BW": pow2_at_least(self.cols)}

    def tile_space(self, program: str, dtype: str) -> dict[str, tuple[int, ...]]:
        # the block sides are the blocks' (padded for tl.dot): only the batch tile is free
        return {"BLOCK_B": (16, 32, 64, 128)} if program in ("forward", "grad_input", "grad_values") else {}

    def call(
        self,
        program: str,
        layout: Layout,
        tile: dict[str, int],
        plan: dict[str, torch.Tensor],
        batch: int,
        rows: int | None = None,
    ) -> KernelCall:
        # the tile's BH/BW are the padded sides (BH_P/BW_P in the kernels); BH/BW are the real ones
        sides = {"BH": self.rows, "BW": self.cols, "BH_P": tile["BH"], "BW_P": tile["BW"]}
        grid = {
            "forward": (cdiv(batch, tile["BLOCK_B"]), layout.grid[0]),
            "grad_input": (cdiv(batch, tile["BLOCK_B"]), layout.grid[1]),
            "grad_values": (layout.n_items,),
            "grow_scores": (layout.grid[0] if rows is None else rows, layout.grid[1]),
        }[program]
        return KernelCall(grid, sides)

    def grow_segment(self, tile: dict[str, int]) -> None:
        return None  # one score per block of the grid, selected on the host

    def grow_output(
        self, layout: Layout, tile: dict[str, int], kc: int, rows: int, listed: int | None = None
    ) -> tuple[tuple[int, ...], torch.dtype, float]:
        return (rows, layout.grid[1]), torch.float32, float("nan")


class BSRFormat(Format):
    name = "bsr"
    spec_type = Block
    family_word = "block"
    count_dims: ClassVar[dict[str, int]] = {"values": 0, "block_cols": 0}

    def family(self, spec: Block) -> str:
        return f"block({spec.rows}x{spec.cols})"

    def storage_spec(self, family: str, out_features: int, in_features: int, n_values: int) -> Block:
        sides = re.fullmatch(r"block\((\d+)x(\d+)\)", family)
        if sides is None:
            raise SparsecError(f"{family!r} is not a block family such as 'block(16x16)' (a layout's op_key)")
        rows, cols = int(sides.group(1)), int(sides.group(2))
        n_blocks = (out_features // rows) * (in_features // cols)
        return Block(rows, cols, unstructured_with(n_blocks, n_values // (rows * cols)).sparsity)

    cases = (
        ("block(16x16, 50%)", 48, 80),
        ("block(32x32, 75%)", 64, 96),
        ("block(4x8, 50%)", 20, 40),  # sides padded to 16 for tl.dot
    )

    def layout(self, spec: Block, out_features: int, in_features: int) -> Layout:
        grid = (out_features // spec.rows, in_features // spec.cols)
        n = grid[0] * grid[1]
        kept = kept_count(n, spec.sparsity)
        return Layout(
            format=self,
            spec=spec,
            out_features=out_features,
            in_features=in_features,
            grid=grid,
            item=(spec.rows, spec.cols),
            unit_size=n,
            kept_per_unit=kept,
            values_shape=(kept, spec.rows, spec.cols),
            buffers=(("block_row_offsets", torch.int32, (grid[0] + 1,)), ("block_cols", torch.int32, (kept,))),
        )

    def encode(
        self, layout: Layout, flat: torch.Tensor, out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        offsets, cols = encode_rows(
            layout, flat, None if out is None else (out["block_row_offsets"], out["block_cols"])
        )
        return {"block_row_offsets": offsets, "block_cols": cols}

    def decode(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return decode_rows(layout, buffers["block_row_offsets"], buffers["block_cols"])

    def values_shape(self, spec: Block) -> tuple[sympy.Expr, ...]:
        blocks = SYM.OUT * SYM.IN / (spec.rows * spec.cols)
        return (kept_expr(blocks, spec.sparsity), sympy.Integer(spec.rows), sympy.Integer(spec.cols))

    def check(self, spec: Block, out_features: int, in_features: int, where: str) -> None:
        if out_features % spec.rows or in_features % spec.cols:
            rows = ", ".join(map(str, divisors(out_features)[:8])) or "1"
            cols = ", ".join(map(str, divisors(in_features)[:8])) or "1"
            raise ShapeError(
                f"{where}: block {spec.rows}x{spec.cols} does not tile the weight; the block height must divide "
                f"out_features={out_features} (e.g. {rows}) and the width must divide in_features={in_features} "
                f"(e.g. {cols})"
            )

    def constraints(self, spec: Block) -> list[tuple[str, sympy.Expr]]:
        return [
            (f"O % {spec.rows} == 0", sympy.Mod(SYM.OUT, spec.rows)),
            (f"I % {spec.cols} == 0", sympy.Mod(SYM.IN, spec.cols)),
        ]

    def index_bytes(self, spec: Block, nnz: sympy.Expr) -> sympy.Expr:
        rows, cols = sympy.Integer(spec.rows), sympy.Integer(spec.cols)
        return 4 * nnz / (rows * cols) + 4 * (SYM.OUT / rows + 1)  # int32 block columns and block row offsets

    def strategy(self, spec: Block) -> Strategy:
        return BlockDot(
            why=(
                "each kept block is one tl.dot (sides padded to powers of two, at least 16, for tensor cores); "
                "a program walks one block row"
            ),
            rows=spec.rows,
            cols=spec.cols,
        )
