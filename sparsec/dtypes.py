"""The one dtype table: IR/kernel dtype names, their torch dtypes, element bytes and Triton pointer types.

``tf32`` is float32 tensors whose products may use TF32 tensor cores (``torch.set_float32_matmul_precision``
other than "highest"); ``fp64`` has IR programs and the cpu backend, but no generated kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsec.errors import SparsecError


@dataclass(frozen=True)
class DType:
    name: str  # IR and kernel name
    torch: torch.dtype
    bytes: int
    kernels: bool  # has generated kernels
    pointer: str  # Triton pointer type of a tensor of it


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("fp16", torch.float16, 2, True, "*fp16"),
        DType("bf16", torch.bfloat16, 2, True, "*bf16"),
        DType("fp32", torch.float32, 4, True, "*fp32"),
        DType("tf32", torch.float32, 4, True, "*fp32"),
        DType("fp64", torch.float64, 8, False, "*fp64"),
    )
}
KERNEL_DTYPES = tuple(name for name, d in DTYPES.items() if d.kernels)
KERNEL_TORCH_DTYPES = frozenset(d.torch for d in DTYPES.values() if d.kernels)
# Index buffers: Triton pointer types of the integer tensors kernels read.
INDEX_POINTERS = {torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}


def name_of(dtype: torch.dtype) -> str:
    """The kernel name of a torch dtype; float32 follows torch.get_float32_matmul_precision ("highest": IEEE
    fp32, else TF32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    for d in DTYPES.values():
        if d.torch == dtype and d.name != "tf32":
            return d.name
    raise SparsecError(f"dtype {dtype} is not supported; sparse layers take {', '.join(sorted(DTYPES))}")


def pointer_of(dtype: torch.dtype) -> str:
    """Triton pointer type of a tensor of ``dtype`` (values, activations or index buffers)."""
    if dtype in INDEX_POINTERS:
        return INDEX_POINTERS[dtype]
    return next(d.pointer for d in DTYPES.values() if d.torch == dtype)
