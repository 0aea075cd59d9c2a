"""N:M sparsity: ``values [out, in*N/M]`` and ``nm_positions`` (each value's position in its group of M).

Positions are uint8 (int32 for M above 256). With M a power of two the kernels decompress a K tile
of W in registers and multiply it with ``tl.dot`` (``DecompressDot``); other M gather (``Gather``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsec.errors import ShapeError
from sparsec.formats.base import SYM, Format, KernelCall, Layout, Strategy, cdiv, chunked_into, divisors
from sparsec.formats.csr import Gather
from sparsec.lazy import lazy_module
from sparsec.spec.specs import NM, parse_spec

sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class DecompressDot(Strategy):
    """Each K tile of W is decompressed to a dense register tile, then ``tl.dot`` (tensor cores)."""

    name = "decompress-dot"
    templates = {
        "forward": ("nm_spmm.py.jinja", {}),
        "grad_input": ("nm_spmm_t.py.jinja", {}),
        "grad_values": ("nm_sddmm.py.jinja", {}),
        "grow_scores": ("grow_topk.py.jinja", {"fmt": "nm"}),
    }
    dense_product = True  # Triton has no sparse tensor-core dot: this saves bytes, not FLOPs
    n: int
    m: int

    def precision(self, program: str, dtype: str) -> str:
        """TF32's grad_input is IEEE too: Triton 3.8 fails to compile that TF32 dot for sm_80/sm_90a
        ("Illegal shared layout" in TritonGPUOptimizeDotOperands)."""
        if dtype == "tf32" and program == "grad_input":
            return "ieee"
        return super().precision(program, dtype)

    def tiles(self, program: str, dtype: str) -> dict[str, int]:
        half = self.precision(program, dtype) == "tensor"
        if program == "grow_scores":
            return {"BLOCK_B": 32, "BLOCK_O": 64 if half else 32, "BLOCK_K": max(64, self.m)}
        # Tensor-core dots: a 64-row M tile lets sm_90a use wgmma (one warpgroup, M = 64). IEEE fp32
        # dots run on FMA units: smaller tiles keep them under 255 registers without spills.
        rows, k = (64 if half else 32), max(64 if half else 32, self.m)
        if program == "grad_values":  # M of its dot is BLOCK_O
            return {"BLOCK_B": 32, "BLOCK_O": rows, "BLOCK_K": k}
        return {"BLOCK_B": rows, "BLOCK_O": 32, "BLOCK_K": k}

    grouped = ("forward", "grad_input", "grad_values")  # grad_values' grid is (output tiles, input tiles)

    def tile_space(self, program: str, dtype: str) -> dict[str, tuple[int, ...]]:
        # every dot side at least 16 (tl.dot's minimum); BLOCK_K whole groups of M
        if program not in ("forward", "grad_input", "grad_values"):
            return {}
        sides = (16, 32, 64, 128)
        return {"BLOCK_B": sides, "BLOCK_O": sides, "BLOCK_K": tuple(sorted({max(k, self.m) for k in (32, 64, 128)}))}

    def plan(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"POS": buffers["nm_positions"]}  # the kernels read the stored positions directly

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
        nm = {"N": self.n, "M": self.m}
        if program == "forward":
            return KernelCall((cdiv(batch, tile["BLOCK_B"]), cdiv(out, tile["BLOCK_O"])), nm)
        if program == "grad_input":
            return KernelCall((cdiv(batch, tile["BLOCK_B"]), cdiv(inn, tile["BLOCK_K"])), nm)
        grid = (
            cdiv(out if rows is None or program != "grow_scores" else rows, tile["BLOCK_O"]),
            cdiv(inn, tile["BLOCK_K"]),
        )
        return KernelCall(grid, {**nm, "SEG": self.m} if program == "grow_scores" else nm)

    def grow_segment(self, tile: dict[str, int]) -> int:
        return self.m  # a segment is a group: its own unit


class NMFormat(Format):
    name = "nm"
    spec_type = NM
    unit_name = "a group of M inputs"
    family_word = None  # N:M keeps a fixed count: its spec text is its family
    count_dims: ClassVar[dict[str, int]] = {}

    def family(self, spec: NM) -> str:
        return str(spec)

    def storage_spec(self, family: str, out_features: int, in_features: int, n_values: int) -> NM:
        return parse_spec(family)

    cases = (
        ("2:4", 37, 52),
        ("1:8", 21, 56),
        ("1:3", 19, 33),  # M not a power of two: the gather strategy
    )

    def layout(self, spec: NM, out_features: int, in_features: int) -> Layout:
        per_row = in_features // spec.m * spec.n
        pos_dtype = torch.uint8 if spec.m <= 256 else torch.int32
        return self.weight_layout(
            spec,
            out_features,
            in_features,
            unit_size=spec.m,
            kept_per_unit=spec.n,
            values_shape=(out_features, per_row),
            buffers=(("nm_positions", pos_dtype, (out_features, per_row)),),
        )

    def encode(
        self, layout: Layout, flat: torch.Tensor, out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        _, dtype, shape = layout.buffers[0]
        pos = out["nm_positions"] if out is not None else torch.empty(shape, dtype=dtype, device=flat.device)
        m = layout.spec.m
        chunked_into(pos.view(-1), flat, lambda part: part % layout.grid[1] % m)
        return {"nm_positions": pos}

    def decode(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = layout.spec
        pos = buffers["nm_positions"].to(torch.int64)
        group = torch.arange(pos.shape[1], device=pos.device) // spec.n
        row = torch.arange(pos.shape[0], device=pos.device)[:, None]
        return (row * layout.in_features + group * spec.m + pos).reshape(-1)

    def values_shape(self, spec: NM) -> tuple[sympy.Expr, ...]:
        return (SYM.OUT, SYM.IN * spec.n / spec.m)

    def units(self, spec: NM) -> sympy.Expr:
        return SYM.OUT * SYM.IN / spec.m

    def check(self, spec: NM, out_features: int, in_features: int, where: str) -> None:
        if in_features % spec.m != 0:
            choices = ", ".join(str(d) for d in divisors(in_features)[:8]) or "none below 64"
            raise ShapeError(
                f"{where}: in_features={in_features} is not divisible by M={spec.m}; "
                f"pad the layer's inputs to a multiple of {spec.m}, choose M in {{{choices}}}, "
                f"or keep the layer dense (dense=[...])"
            )

    def constraints(self, spec: NM) -> list[tuple[str, sympy.Expr]]:
        return [(f"I % {spec.m} == 0", sympy.Mod(SYM.IN, spec.m))]

    def index_bytes(self, spec: NM, nnz: sympy.Expr) -> sympy.Expr:
        return 1 * nnz  # one position byte per stored value

    def strategy(self, spec: NM) -> Strategy:
        if _is_pow2(spec.m):
            return DecompressDot(
                why=(
                    "N:M values are decompressed to a dense tile in registers and fed to tl.dot: Triton has no "
                    "sparse tensor-core dot, so this saves bytes (values + 1-byte positions), not FLOPs"
                ),
                n=spec.n,
                m=spec.m,
            )
        return Gather(
            why=f"M={spec.m} is not a power of two: no register tile of M columns; gathers inputs",
            grow_block_k=max(64, spec.m),
            # the groups straddle grow_scores' segments, and its exactness check needs segments nested in units
            grows=False,
        )
