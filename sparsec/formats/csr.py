"""Unstructured sparsity in CSR, and the gather kernels every row-walking format without tl.dot shares.

Storage: ``values [nnz]`` in row-major order, ``row_offsets [out + 1]`` and ``col_indices [nnz]``
(int32). The gather kernels (``Gather``) also serve fan-in (ELL) and N:M with M not a power of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsec.formats.base import (
    SYM,
    Format,
    KernelCall,
    Layout,
    Strategy,
    cdiv,
    decode_rows,
    encode_rows,
    kept_count,
    kept_expr,
)
from sparsec.lazy import lazy_module
from sparsec.spec.specs import Unstructured, unstructured_with

sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec


def longest_row(layout: Layout) -> int:
    """The most items a row can keep: the grow kernel's binary search runs this many steps' worth
    (a bound from the layout, so no mask change recompiles the kernel or reads the device)."""
    if layout.unit_size <= layout.in_features:  # rows of whole units (fan-in rows, N:M groups)
        return layout.kept_per_unit * (layout.in_features // layout.unit_size)
    return min(layout.in_features, layout.nnz)


@dataclass(frozen=True)
class Gather(Strategy):
    """Rows gather their inputs on CUDA cores; ``dX`` gathers through the CSR of ``W^T`` (no atomics)."""

    name = "gather"
    templates = {
        "forward": ("csr_spmm.py.jinja", {"has_perm": False}),
        "grad_input": ("csr_spmm.py.jinja", {"has_perm": True, "bias": False, "activation": None}),
        "grad_values": ("coo_sddmm.py.jinja", {}),
        "grow_scores": ("grow_topk.py.jinja", {"fmt": "csr"}),
    }
    tensor_cores = False
    grow_block_k: int = 32  # BLOCK_K of grow_scores: its segment width
    grows: bool = True  # False where segments straddle units (see runtime/grow.py)

    def tiles(self, program: str, dtype: str) -> dict[str, int]:
        # The 3-D gather lives in registers: BLOCK_B x BLOCK_O x BLOCK_J stays small.
        if program == "grow_scores":  # a [BLOCK_O, BLOCK_K] tile of |dY^T X| per program
            half = self.precision(program, dtype) == "tensor"
            return {"BLOCK_B": 32, "BLOCK_O": 64 if half else 32, "BLOCK_K": self.grow_block_k}
        if program == "grad_values":
            return {"BLOCK_E": 32, "BLOCK_B": 16}
        return {"BLOCK_B": 16, "BLOCK_O": 16, "BLOCK_J": 16}

    def tile_space(self, program: str, dtype: str) -> dict[str, tuple[int, ...]]:
        # no tl.dot: any power of two; small batch tiles for decode-sized batches
        if program == "grad_values":
            return {"BLOCK_E": (32, 64, 128, 256), "BLOCK_B": (8, 16, 32)}
        if program in ("forward", "grad_input"):
            return {"BLOCK_B": (4, 16, 32, 64), "BLOCK_O": (16, 32, 64), "BLOCK_J": (8, 16, 32)}
        return {}

    def call(
        self,
        program: str,
        layout: Layout,
        tile: dict[str, int],
        plan: dict[str, torch.Tensor],
        batch: int,
        rows: int | None = None,
    ) -> KernelCall:
        out, inn = layout.out_features, layout.in_features
        if program == "forward":
            return KernelCall((cdiv(batch, tile["BLOCK_B"]), cdiv(out, tile["BLOCK_O"])))
        if program == "grad_input":
            return KernelCall((cdiv(batch, tile["BLOCK_B"]), cdiv(inn, tile["BLOCK_O"])))
        if program == "grad_values":
            return KernelCall((cdiv(layout.nnz, tile["BLOCK_E"]),), {"NNZ": layout.nnz})
        return KernelCall(
            (cdiv(out if rows is None else rows, tile["BLOCK_O"]), cdiv(inn, tile["BLOCK_K"])),
            {"SEG": tile["BLOCK_K"], "SEARCH_STEPS": longest_row(layout).bit_length() + 1},
        )

    @property
    def grows_on_kernel(self) -> bool:
        return self.grows


class CSRFormat(Format):
    name = "csr"
    spec_type = Unstructured
    family_word = "unstructured"
    count_dims: ClassVar[dict[str, int]] = {"values": 0, "col_indices": 0}

    def storage_spec(self, family: str, out_features: int, in_features: int, n_values: int) -> Unstructured:
        return unstructured_with(out_features * in_features, n_values)

    cases = (("90%", 37, 53),)

    def layout(self, spec: Unstructured, out_features: int, in_features: int) -> Layout:
        kept = kept_count(out_features * in_features, spec.sparsity)
        return self.weight_layout(
            spec,
            out_features,
            in_features,
            unit_size=out_features * in_features,
            kept_per_unit=kept,
            values_shape=(kept,),
            buffers=(("row_offsets", torch.int32, (out_features + 1,)), ("col_indices", torch.int32, (kept,))),
        )

    def encode(
        self, layout: Layout, flat: torch.Tensor, out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        offsets, cols = encode_rows(layout, flat, None if out is None else (out["row_offsets"], out["col_indices"]))
        return {"row_offsets": offsets, "col_indices": cols}

    def decode(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return decode_rows(layout, buffers["row_offsets"], buffers["col_indices"])

    def compressed_rows(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return buffers["row_offsets"], buffers["col_indices"]

    def values_shape(self, spec: Unstructured) -> tuple[sympy.Expr, ...]:
        return (kept_expr(SYM.OUT * SYM.IN, spec.sparsity),)

    def index_bytes(self, spec: Unstructured, nnz: sympy.Expr) -> sympy.Expr:
        return 4 * nnz + 4 * (SYM.OUT + 1)  # int32 columns and row offsets

    def strategy(self, spec: Unstructured) -> Strategy:
        return Gather(why="compressed rows gather their inputs; rows of unequal length are masked")
