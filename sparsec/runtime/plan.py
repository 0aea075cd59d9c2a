"""Index plans: the device-side structures a format's kernels read, built once per mask.

Everything here is O(kept weights): CSR/ELL column lists, the CSR of ``W^T`` with a permutation
into the stored values (so ``dX = dY @ W`` gathers instead of scattering with atomics), row
indices for the SDDMM, and the block-column structure of a BSR weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsec.formats import Layout


def _offsets(index: torch.Tensor, n: int) -> torch.Tensor:
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    ptr[1:] = torch.bincount(index, minlength=n).cumsum(0)
    return ptr.to(torch.int32)


@dataclass(frozen=True)
class TritonPlan:
    ptr: torch.Tensor  # row (block row) offsets of W
    idx: torch.Tensor  # column (block column) of every stored item, stored order
    rows: torch.Tensor  # row (block row) of every stored item, stored order
    ptr_t: torch.Tensor  # offsets of W^T's rows (W's columns / block columns)
    idx_t: torch.Tensor  # W's row (block row) of every item of W^T, in W^T order
    perm_t: torch.Tensor  # stored slot of every item of W^T, in W^T order

    @staticmethod
    def build(layout: Layout, flat: torch.Tensor) -> TritonPlan:
        """From sorted flat item positions (items are weights, or blocks for block specs)."""
        rows_n, cols_n = layout.grid
        rows, cols = flat // cols_n, flat % cols_n
        perm_t = (cols * rows_n + rows).argsort()
        i32 = torch.int32
        return TritonPlan(
            ptr=_offsets(rows, rows_n),
            idx=cols.to(i32),
            rows=rows.to(i32),
            ptr_t=_offsets(cols, cols_n),
            idx_t=rows[perm_t].to(i32),
            perm_t=perm_t.to(i32),
        )
