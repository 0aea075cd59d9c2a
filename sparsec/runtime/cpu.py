"""The CPU execution path: sparse matmul forward, input gradient and sampled weight gradient.

``Y = X @ W^T`` runs as a CSR product; ``dX = dY @ W`` as a product with the CSR of ``W^T``; the
gradient of the kept values is ``dY^T @ X`` sampled at the kept positions (SDDMM,
``torch.sparse.sampled_addmm``), so the dense ``[out, in]`` weight gradient never exists. The custom
ops of ``runtime.ops`` call these on the cpu backend.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from sparsec.formats import Layout
from sparsec.formats.base import offsets


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


@dataclass(frozen=True)
class CSRPlan:
    """CSR index structures of ``W`` and ``W^T`` for one mask, and where each value goes."""

    shape: tuple[int, int]
    crow: torch.Tensor
    col: torch.Tensor
    order: torch.Tensor | None  # CSR slot -> stored value (None: stored order is CSR order)
    crow_t: torch.Tensor
    col_t: torch.Tensor
    order_t: torch.Tensor  # CSR-of-W^T slot -> stored value

    @staticmethod
    def build(layout: Layout, flat_items: torch.Tensor) -> CSRPlan:
        out, inn = layout.out_features, layout.in_features
        elem = layout.element_positions(flat_items)
        order = None if layout.item == (1, 1) else elem.argsort()
        sorted_elem = elem if order is None else elem[order]
        rows, cols = sorted_elem // inn, sorted_elem % inn
        crow = offsets(rows, out)
        order_t = (elem % inn * out + elem // inn).argsort()
        rows_t, cols_t = elem[order_t] % inn, elem[order_t] // inn
        return CSRPlan((out, inn), crow, cols, order, offsets(rows_t, inn), cols_t, order_t)

    def weight(self, values: torch.Tensor) -> torch.Tensor:
        v = values.reshape(-1)
        return _csr(self.crow, self.col, v if self.order is None else v[self.order], self.shape)

    def weight_t(self, values: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow_t, self.col_t, values.reshape(-1)[self.order_t], self.shape[::-1])

    def sampled_grad(self, dy: torch.Tensor, x: torch.Tensor, values_shape) -> torch.Tensor:
        """``(dY^T @ X)`` at the kept positions, in stored value order."""
        pattern = _csr(self.crow, self.col, torch.zeros(self.col.numel(), dtype=dy.dtype, device=dy.device), self.shape)
        sampled = torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()
        if self.order is None:
            return sampled.view(values_shape)
        out = torch.empty_like(sampled)
        out[self.order] = sampled
        return out.view(values_shape)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    # PyTorch's CPU CSR kernels take float32/float64 only: half types compute in float32 there.
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def csr_forward(plan: CSRPlan, x2d: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x2d @ W^T`` (no bias)."""
    with torch.autocast(x2d.device.type, enabled=False):  # the op computes in its inputs' dtypes
        dt = compute_dtype(x2d)
        # row-major result, like the dense op and the fake kernel of sparsec::spmm
        return torch.sparse.mm(plan.weight(values.to(dt)), x2d.to(dt).t()).t().to(x2d.dtype).contiguous()


def csr_grad_input(plan: CSRPlan, dy: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``dy @ W`` through the CSR of ``W^T``."""
    with torch.autocast(dy.device.type, enabled=False):  # the op computes in its inputs' dtypes
        dt = compute_dtype(dy)
        return torch.sparse.mm(plan.weight_t(values.to(dt)), dy.to(dt).t()).t().to(dy.dtype).contiguous()


def csr_grad_values(plan: CSRPlan, dy: torch.Tensor, x2d: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(dy^T @ x2d)`` at the kept positions, in stored order (SDDMM)."""
    with torch.autocast(dy.device.type, enabled=False):  # the op computes in its inputs' dtypes
        dt = compute_dtype(dy)
        return plan.sampled_grad(dy.to(dt), x2d.to(dt), values.shape).to(values.dtype)
