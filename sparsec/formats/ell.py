"""Constant fan-in in ELL: ``values [out, k]`` and ``fanin_indices [out, k]`` (int32, sorted in a row).

Every output row keeps the same ``k`` inputs; the kernels are the CSR gather kernels over the
row plan (``csr.Gather``): rows of equal length waste no work.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sparsec.errors import ShapeError
from sparsec.formats.base import SYM, Format, Layout, Strategy, chunked_into, int32_index, kept_count, kept_expr
from sparsec.formats.csr import Gather
from sparsec.lazy import lazy_module
from sparsec.spec.specs import FanIn

sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec


class ELLFormat(Format):
    name = "ell"
    spec_type = FanIn
    unit_name = "an output row"
    family_word = "fanin"
    count_dims: ClassVar[dict[str, int]] = {"values": 1, "fanin_indices": 1}

    def storage_spec(self, family: str, out_features: int, in_features: int, n_values: int) -> FanIn:
        return FanIn(k=n_values // out_features)

    cases = (("fanin(k=7)", 37, 53),)

    def layout(self, spec: FanIn, out_features: int, in_features: int) -> Layout:
        k = spec.k if spec.k is not None else kept_count(in_features, spec.sparsity)
        return self.weight_layout(
            spec,
            out_features,
            in_features,
            unit_size=in_features,
            kept_per_unit=k,
            values_shape=(out_features, k),
            buffers=(("fanin_indices", torch.int32, (out_features, k)),),
        )

    def encode(
        self, layout: Layout, flat: torch.Tensor, out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        idx = (
            out["fanin_indices"]
            if out is not None
            else torch.empty(layout.buffers[0][2], dtype=torch.int32, device=flat.device)
        )
        chunked_into(idx.view(-1), flat, lambda part: part % layout.grid[1])
        return {"fanin_indices": idx}

    def decode(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        idx = buffers["fanin_indices"].to(torch.int64)
        row = torch.arange(idx.shape[0], device=idx.device)[:, None]
        return (row * layout.in_features + idx).reshape(-1)

    def compressed_rows(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = buffers["fanin_indices"]  # every row keeps idx.shape[1], ascending
        starts = torch.arange(idx.shape[0] + 1, device=idx.device, dtype=torch.int64) * idx.shape[1]
        return int32_index(starts, "row offsets"), idx.reshape(-1)

    def values_shape(self, spec: FanIn) -> tuple[sympy.Expr, ...]:
        return (SYM.OUT, sympy.Integer(spec.k) if spec.k is not None else kept_expr(SYM.IN, spec.sparsity))

    def units(self, spec: FanIn) -> sympy.Expr:
        return SYM.OUT

    def check(self, spec: FanIn, out_features: int, in_features: int, where: str) -> None:
        if spec.k is not None and spec.k > in_features:
            raise ShapeError(
                f"{where}: fan-in k={spec.k} is larger than in_features={in_features}; choose k <= {in_features}"
            )

    def constraints(self, spec: FanIn) -> list[tuple[str, sympy.Expr]]:
        return [(f"{spec.k} <= I", sympy.Le(spec.k, SYM.IN))] if spec.k is not None else []

    def index_bytes(self, spec: FanIn, nnz: sympy.Expr) -> sympy.Expr:
        return 4 * nnz  # one int32 column per stored value

    def strategy(self, spec: FanIn) -> Strategy:
        return Gather(why="constant fan-in rows gather their k inputs: no wasted work, CUDA cores")
