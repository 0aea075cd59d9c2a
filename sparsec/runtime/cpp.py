"""The cpp backend: generated C++ kernels (``kernels/cpu``) for the forward and both gradients on the CPU.

Unstructured, N:M and fan-in layers are walked as rows of their kept weights: ``Y = X W^T`` over the rows
of ``W``, ``dX = dY W`` over the rows of ``W^T`` (the kernel puts the stored values in that order once
per call), and the kept values' gradient as one dot over the batch per kept position. The products copy
their batch-major input batch-tile-major, so each kept weight is a register-blocked axpy over an
L2-resident tile; the gradient dots run over feature-major copies. Block layers run as dense micro-tiles:
micro-GEMMs on the stored blocks (``kernels/cpu/rows.cpp.jinja`` says why each). bfloat16
tensors go to the kernels as they are (read widened to float32, written rounded to nearest even, as
``.to(torch.bfloat16)`` rounds: half the bytes of the copies); float16 is widened to float32 before them.
Index columns are 16-bit where they fit, value slots 32-bit. Threads: torch's intra-op count.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import threading
from dataclasses import dataclass

import torch

from sparsec.codegen.cpp import compiler, load
from sparsec.codegen.render import render
from sparsec.errors import SparsecError
from sparsec.formats import Layout
from sparsec.formats.base import compressed_rows_of, offsets
from sparsec.runtime.cpu import CSRPlan, compute_dtype

# tensor dtype -> (compute type, tensor element type) of the kernels; fp16 is widened to fp32 before them
KERNEL_TYPES = {
    torch.float32: ("float", "float"),
    torch.float64: ("double", "double"),
    torch.bfloat16: ("float", "bf16"),
}
INDEX_TYPES = {torch.uint16: "uint16_t", torch.int32: "int32_t", torch.int64: "int64_t"}
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass(eq=False)
class CppPlan:
    """Rows of ``W`` and of ``W^T``, and where each entry's value is stored. Column indices are 16-bit
    where the columns they index fit (``in_features``, ``out_features`` <= 65536), else 32-bit: the
    indices are a third of a sparse product's bytes at 16 bits, half at 32.

    A plan of single weights holds W^T only once a ``dy @ W`` walks it (``transposed``): the products at
    batches of one tile, and denser layers, scatter through W's rows instead, so an update that rebuilds
    the plan rebuilds no W^T for them (``_weights_plan``)."""

    offsets: torch.Tensor  # int64 [out + 1]
    cols: torch.Tensor  # uint16 or int32
    order: torch.Tensor | None  # entry -> stored slot (None: stored order); int32, or int64 past 2^31
    offsets_t: torch.Tensor | None  # int64 [in + 1] (None: not built yet)
    cols_t: torch.Tensor | None  # uint16 or int32
    order_t: torch.Tensor | None  # int32 or int64
    shape: tuple[int, int]
    # Blocks (BSR layouts; None otherwise): the block rows of W and of W^T for the micro-tile kernels
    block: tuple[int, int] | None = None  # R x C
    block_offsets: torch.Tensor | None = None  # int64 [out / R + 1]
    block_cols: torch.Tensor | None = None  # int32 block column of each stored block
    block_offsets_t: torch.Tensor | None = None  # int64 [in / C + 1]
    block_rows_t: torch.Tensor | None = None  # int32 block row of each block, by block column
    block_slots_t: torch.Tensor | None = None  # int64 stored block of each, by block column
    stale_t: bool = False  # W^T's tensors hold an earlier mask: rebuilt into them at their next use

    @staticmethod
    def of_rows(
        row_offsets: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], into: CppPlan | None = None
    ) -> CppPlan:
        """The plan of a layout of single weights (values stored in row-major order) from its compressed rows
        (int32 ``row_offsets [out + 1]`` and ``cols [n]``, rows ascending): the generated kernel's copy
        (``kernels/cpu/plan.cpp.jinja``). Written into ``into``'s tensors where they fit (an update's
        rebuild: the storage a captured graph reads, and no second plan at once)."""
        ins = (row_offsets.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous().view(-1))
        n = ins[1].numel()
        ptrs = [t.data_ptr() for t in ins]
        return _weights_plan("sparsec_rows_plan", [*ptrs, n, shape[0], torch.get_num_threads()], n, shape, into)

    @staticmethod
    def of_weights(flat: torch.Tensor, shape: tuple[int, int], into: CppPlan | None = None) -> CppPlan:
        """The plan of a layout of single weights (values stored in flat order) from its sorted flat
        positions: the rows walked as the positions pass their ends, then as ``of_rows``."""
        flat = flat.to(torch.int64).contiguous()
        ins = [flat.data_ptr(), flat.numel(), *shape]
        return _weights_plan("sparsec_flat_plan", ins, flat.numel(), shape, into)

    def transposed(self) -> CppPlan:
        """This plan with W^T built (a single-weight plan's first use of it, or its first since an update:
        the generated counting sort, into the tensors it held). Thread-safe: two backwards through one layer
        build it once."""
        if self.offsets_t is not None and not self.stale_t:
            return self
        with _TRANSPOSE_LOCK:
            if self.offsets_t is None or self.stale_t:  # not built by a thread that held the lock first
                self._build_transposed()
        return self

    def release_transposed(self) -> None:
        """Let go of W^T (its next use builds it again): what a caller that built it only to time it does.
        Not while another thread walks it (the tuner calls it from the thread whose call it tunes)."""
        with _TRANSPOSE_LOCK:
            self.offsets_t = None  # first: transposed() checks it without the lock
            self.cols_t = self.order_t = None
            self.stale_t = False

    def _build_transposed(self) -> None:
        out, inn = self.shape
        n = self.cols.numel()
        dtypes = (_index_dtype(out), _slot_dtype(n))
        cols_t, order_t, offsets_t = self.cols_t, self.order_t, self.offsets_t
        if cols_t is None or cols_t.numel() != n or (cols_t.dtype, order_t.dtype) != dtypes:
            cols_t, order_t = (torch.empty(n, dtype=d) for d in dtypes)
            offsets_t = torch.empty(inn + 1, dtype=torch.int64)
        lib = _plan_library(INDEX_TYPES[self.cols.dtype], *(INDEX_TYPES[d] for d in dtypes))
        # the kernel runs without the GIL: the tensors are published on the plan only once they hold W^T
        lib.sparsec_transpose_plan(
            self.offsets.data_ptr(), self.cols.data_ptr(), n, out, inn, offsets_t.data_ptr(),
            cols_t.data_ptr(), order_t.data_ptr(), PLAN_DIRECT_BYTES, PLAN_CHUNK, torch.get_num_threads(),
        )  # fmt: skip
        self.cols_t, self.order_t = cols_t, order_t
        self.offsets_t = offsets_t  # last: transposed() checks it without the lock
        self.stale_t = False

    @staticmethod
    def build(csr: CSRPlan, layout: Layout, flat_items: torch.Tensor) -> CppPlan:
        """From the CSR plan; a layout whose items are blocks (stored item by item, ascending, as
        ``flat_items`` lists them on the item grid) also gets the block rows of W and W^T."""
        out, inn = csr.shape
        order = None if csr.order is None else _narrow_slots(csr.order)
        col, col_t = _narrow(csr.col, inn), _narrow(csr.col_t, out)
        rows = CppPlan(csr.crow, col, order, csr.crow_t, col_t, _narrow_slots(csr.order_t), csr.shape)
        flat = flat_items.long()
        if layout.item == (1, 1) or not bool((flat[1:] > flat[:-1]).all()):  # not blocks stored in grid order
            return rows
        n_brows, n_bcols = layout.grid
        brow, bcol = flat // n_bcols, flat % n_bcols
        by_col = (bcol * n_brows + brow).argsort()
        return dataclasses.replace(
            rows,
            block=tuple(layout.item),
            block_offsets=offsets(brow, n_brows),
            block_cols=bcol.int(),
            block_offsets_t=offsets(bcol[by_col], n_bcols),
            block_rows_t=brow[by_col].int(),
            block_slots_t=by_col,
        )


def _index_dtype(extent: int) -> torch.dtype:
    """The narrowest type the kernels read for indices below ``extent``."""
    return torch.uint16 if extent <= 1 << 16 else torch.int32


def _narrow(cols: torch.Tensor, extent: int) -> torch.Tensor:
    """Column indices below ``extent`` in the narrowest type the kernels read."""
    return cols.to(_index_dtype(extent))


def _weights_plan(entry: str, ins: list[int], n: int, shape: tuple[int, int], into: CppPlan | None) -> CppPlan:
    """W's rows written by the plan kernel's ``entry`` (ins: its inputs before the outputs), into ``into``
    where it is a plan of single weights of this shape and size; its W^T, if it held one, goes stale."""
    out, inn = shape
    plan = into
    if plan is None or plan.block is not None or plan.order is not None or plan.shape != tuple(shape):
        plan = None
    elif plan.cols.numel() != n or plan.cols.dtype != _index_dtype(inn):
        plan = None
    if plan is None:
        rows = torch.empty(out + 1, dtype=torch.int64), torch.empty(n, dtype=_index_dtype(inn))
        plan = CppPlan(*rows, None, None, None, None, tuple(shape))
    lib = _plan_library(INDEX_TYPES[plan.cols.dtype], INDEX_TYPES[_index_dtype(out)], INDEX_TYPES[_slot_dtype(n)])
    getattr(lib, entry)(*ins, plan.offsets.data_ptr(), plan.cols.data_ptr())
    plan.stale_t = True
    return plan


@functools.cache
def _plan_library(col: str, col_t: str, slot: str) -> ctypes.CDLL:
    lib = load(render("cpu/plan.cpp.jinja", col=col, col_t=col_t, slot=slot))
    lib.sparsec_rows_plan.argtypes = [_P, _P, _I64, _I64, _INT, _P, _P]
    lib.sparsec_flat_plan.argtypes = [_P, _I64, _I64, _I64, _P, _P]
    lib.sparsec_transpose_plan.argtypes = [_P, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _INT]
    lib.sparsec_rows_plan.restype = lib.sparsec_flat_plan.restype = lib.sparsec_transpose_plan.restype = None
    return lib


def _slot_dtype(n: int) -> torch.dtype:
    """Value slots of ``n`` values in 32 bits where they fit: the permutation streams them."""
    return torch.int32 if n <= 1 << 31 else torch.int64


def _narrow_slots(order: torch.Tensor) -> torch.Tensor:
    """Value slots (a permutation of the values) in the type ``_slot_dtype`` gives."""
    return order.to(_slot_dtype(order.numel()))


@functools.cache
def cpp_problem() -> str | None:
    """None when the kernels build and load on this machine; else why they cannot (checked once)."""
    if compiler() is None:
        return "no C++ compiler found: set CXX or install g++"
    try:
        _library("float", "float", "uint16_t", "int32_t")
    except (SparsecError, OSError) as e:
        return str(e).splitlines()[0]
    return None


@functools.cache
def _tiling(scalar: str) -> tuple[int, int]:
    """(rows per batch tile, vector lanes): batches under one vector gather without scratch."""
    lib = _library(scalar, scalar, "int32_t", "int32_t")
    return lib.sparsec_batch_tile(), lib.sparsec_vector_lanes()


@functools.cache
def _library(scalar: str, io: str, index: str, slot: str) -> ctypes.CDLL:
    lib = load(render("cpu/rows.cpp.jinja", scalar=scalar, io=io, index=index, slot=slot))
    lib.sparsec_rows_spmm.argtypes = [_P] * 10 + [_I64] * 3 + [_INT]
    lib.sparsec_rows_spmm.restype = None
    lib.sparsec_rows_spmm_scatter.argtypes = [_P] * 6 + [_I64] * 3 + [_INT]
    lib.sparsec_rows_spmm_scatter.restype = None
    lib.sparsec_rows_spmm_scatter_tiles.argtypes = [_P] * 7 + [_I64] * 3 + [_INT]
    lib.sparsec_rows_spmm_scatter_tiles.restype = None
    lib.sparsec_rows_sddmm.argtypes = [_P] * 8 + [_I64] * 3 + [_INT]
    lib.sparsec_rows_sddmm.restype = None
    lib.sparsec_rows_sddmm_tiles.argtypes = [_P] * 6 + [_I64] * 3 + [_INT]
    lib.sparsec_rows_sddmm_tiles.restype = None
    for dense_io in (lib.sparsec_rows_densify, lib.sparsec_rows_sample):
        dense_io.argtypes, dense_io.restype = [_P] * 5 + [_I64] * 2 + [_INT], None
    for query in (lib.sparsec_batch_tile, lib.sparsec_vector_lanes):
        query.argtypes, query.restype = [], _I64
    lib.sparsec_dots_ld.argtypes, lib.sparsec_dots_ld.restype = [_I64], _I64
    lib.sparsec_work_bytes.argtypes, lib.sparsec_work_bytes.restype = [], _I64
    lib.sparsec_has_block_kernels.argtypes, lib.sparsec_has_block_kernels.restype = [], _I64
    if lib.sparsec_has_block_kernels():
        lib.sparsec_block_spmm.argtypes = [_P] * 9 + [_I64] * 5 + [_INT, _INT]
        lib.sparsec_block_spmm.restype = None
        lib.sparsec_block_sddmm.argtypes = [_P] * 7 + [_I64] * 5 + [_INT]
        lib.sparsec_block_sddmm.restype = None
    return lib


def _slot_type(order: torch.Tensor | None) -> str:
    return "int32_t" if order is None else INDEX_TYPES[order.dtype]  # no order: any build serves


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _scratch(n: int, like: torch.Tensor) -> torch.Tensor:
    """Scratch of ``n`` elements of the compute type (float32 for bfloat16 tensors)."""
    return like.new_empty(n, dtype=compute_dtype(like))


# The plan kernel's W^T: scattered directly while its arrays fit a last-level cache (this CPU's 32 MB; measured
# 5 ms at 2.7M entries on 2 threads, 10 ms on one), else through 256 column buckets a chunk of entries at a
# time (0.6-1.2 s at 43M over 65536 columns, against 4.5 s direct: a cache and TLB miss per entry).
PLAN_DIRECT_BYTES, PLAN_CHUNK = 32 << 20, 1 << 20
_TRANSPOSE_LOCK = threading.Lock()  # CppPlan.transposed: one build of a plan's W^T at a time

TILE_DOTS_DENSITY = 0.03  # below: the dots read the step's tiles (measured: faster at 98-99%, slower at 90-95%)


def dots_read_tiles(plan: CppPlan, values: torch.Tensor) -> bool:
    """Whether ``cpp_grad_values`` reads the step's tiles for this layer (rows below TILE_DOTS_DENSITY;
    blocks run their own micro-GEMMs): only then are they worth holding from forward to backward."""
    out, inn = plan.shape
    return plan.block is None and values.numel() < TILE_DOTS_DENSITY * out * inn


def _made_of(tiles: Tiles | None, src: torch.Tensor) -> bool:
    return tiles is not None and tiles.made_of == (src.dtype, src.shape)


def _work(lib: ctypes.CDLL, n: int, like: torch.Tensor) -> torch.Tensor:
    """Scratch of ``n`` elements of the kernels' copies: bf16 where their dots are bf16, else the compute type."""
    return like.new_empty(n * lib.sparsec_work_bytes(), dtype=torch.uint8)


@dataclass(frozen=True)
class Tiles:
    """A product's batch-tile copy of its input (``sparsec_rows_spmm``'s SRC_T), handed by the eager training
    path (``runtime.ops``) to the same step's gradient dots through autograd's ctx, never through the tensor:
    they cannot outlive, or go stale against, the step they belong to."""

    data: torch.Tensor  # uint8, work elements
    made_of: tuple[torch.dtype, torch.Size]  # what the kernels read: dtype and shape


def _spmm(src, values, offsets, cols, order, bias, n_rows: int) -> tuple[torch.Tensor, Tiles | None]:
    """The product, and the batch tiles it made of ``src`` (None: a batch under one vector gathers)."""
    b, n_src = src.shape
    out = src.new_empty(b, n_rows)
    scalar, io = KERNEL_TYPES[src.dtype]
    tile, lanes = _tiling(scalar)
    lib = _library(scalar, io, INDEX_TYPES[cols.dtype], _slot_type(order))
    src_t = out_t = values_t = None  # batches under one vector gather from SRC: no scratch
    if b >= lanes:
        padded = -(-b // tile) * tile  # whole batch tiles
        src_t, out_t = _work(lib, padded * n_src, src), _scratch(padded * n_rows, src)  # held: the call reads them
        if order is not None or lib.sparsec_work_bytes() != src.element_size():
            values_t = _work(lib, values.numel(), src)
    lib.sparsec_rows_spmm(
        src.data_ptr(),
        values.data_ptr(),
        offsets.data_ptr(),
        cols.data_ptr(),
        _ptr(order),
        _ptr(bias),
        out.data_ptr(),
        _ptr(src_t),
        _ptr(out_t),
        _ptr(values_t),
        b,
        n_rows,
        n_src,
        torch.get_num_threads(),  # torch's intra-op count (torch.set_num_threads holds)
    )
    return out, None if src_t is None else Tiles(src_t, (src.dtype, src.shape))


def _block_kernels(plan: CppPlan, src: torch.Tensor, micro_tiles: bool) -> ctypes.CDLL | None:
    """The library whose block micro-tile kernels serve this call, or None: not a block layout, rows asked
    for (``micro_tiles=False``: the tuner's other candidate), a batch under one vector (the rows gather), or
    bf16 layers on bf16 dots (their tiles are bf16 pairs: rows)."""
    if plan.block is None or not micro_tiles:
        return None
    scalar, io = KERNEL_TYPES[src.dtype]
    lib = _library(scalar, io, "int32_t", "int32_t")
    return lib if src.shape[0] >= _tiling(scalar)[1] and lib.sparsec_has_block_kernels() else None


def _block_product(lib, src, values, boff, bcol, bslot, bias, n_out: int, block: tuple[int, int], transposed: bool):
    b, n_src = src.shape
    scalar, _ = KERNEL_TYPES[src.dtype]
    tile = _tiling(scalar)[0]
    padded = -(-b // tile) * tile
    out = src.new_empty(b, n_out)
    src_t, out_t = _work(lib, padded * n_src, src), _scratch(padded * n_out, src)  # held: the call reads them
    lib.sparsec_block_spmm(
        src.data_ptr(),
        values.data_ptr(),
        boff.data_ptr(),
        bcol.data_ptr(),
        _ptr(bslot),
        _ptr(bias),
        out.data_ptr(),
        src_t.data_ptr(),
        out_t.data_ptr(),
        b,
        boff.numel() - 1,
        n_src,
        *block,
        int(transposed),
        torch.get_num_threads(),
    )
    return out, Tiles(src_t, (src.dtype, src.shape))


def _inputs(*tensors):
    """The tensors in a dtype the kernels read (bfloat16 as it is; float16 widened to float32), contiguous
    (values may keep their shape: the kernels read them flat)."""
    dt = tensors[0].dtype if tensors[0].dtype in KERNEL_TYPES else compute_dtype(tensors[0])
    # the ops run under autograd's dispatch: their inputs need no detach
    return [t if t is None or (t.dtype == dt and t.is_contiguous()) else t.to(dt).contiguous() for t in tensors]


def cpp_forward_tiles(
    plan: CppPlan, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, micro_tiles: bool = True
) -> tuple[torch.Tensor, Tiles | None]:
    """``x @ W^T + bias``, and the batch tiles of ``x`` it made (for the step's gradient dots); a block layer
    runs micro-tiles on its blocks unless ``micro_tiles`` is False (then its rows, as any layer's)."""
    xs, v, b = _inputs(x, values, bias)
    blocks = _block_kernels(plan, xs, micro_tiles)
    if blocks is not None:  # dense micro-tiles over the stored blocks
        y, tiles = _block_product(
            blocks, xs, v, plan.block_offsets, plan.block_cols, None, b, plan.shape[0], plan.block, False
        )
    else:
        y, tiles = _spmm(xs, v, plan.offsets, plan.cols, plan.order, b, plan.shape[0])
    return (y if y.dtype == x.dtype else y.to(x.dtype)), tiles


def cpp_forward(
    plan: CppPlan, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, micro_tiles: bool = True
) -> torch.Tensor:
    """``x @ W^T + bias``."""
    return cpp_forward_tiles(plan, x, values, bias, micro_tiles)[0]


def cpp_grad_input_tiles(
    plan: CppPlan, dy: torch.Tensor, values: torch.Tensor, micro_tiles: bool = True, walk: str | None = None
) -> tuple[torch.Tensor, Tiles | None]:
    """``dy @ W``, and the batch tiles of ``dy`` it made: a scatter through the rows of ``W``, or the rows
    of ``W^T`` (the kernel puts the stored values in their order once per call), as
    ``scatters_grad_input`` chooses (``walk``: see there)."""
    g, v = _inputs(dy, values)
    blocks = _block_kernels(plan, g, micro_tiles)
    if blocks is not None:  # the blocks by block column, each read transposed
        dx, tiles = _block_product(
            blocks,
            g,
            v,
            plan.block_offsets_t,
            plan.block_rows_t,
            plan.block_slots_t,
            None,
            plan.shape[1],
            plan.block,
            True,
        )
    elif plan.order is None and g.shape[0] < _tiling(KERNEL_TYPES[g.dtype][0])[1]:
        dx, tiles = _scatter_product(g, v, plan), None  # W's rows, values in sequence: no order to read through
    elif scatters_grad_input(plan, g.shape[0], g.dtype, walk):
        dx, tiles = _scatter_tiles_product(g, v, plan)
    else:
        wt = plan.transposed()
        dx, tiles = _spmm(g, v, wt.offsets_t, wt.cols_t, wt.order_t, None, plan.shape[1])
    return (dx if dx.dtype == dy.dtype else dx.to(dy.dtype)), tiles


# ``dy @ W`` scatters through W's rows (no W^T, no permutation of the values) where the layer is at least this
# dense, or the batch is one tile and the gradient no wider than dy. Measured against the walk of W^T's rows on
# 2 AVX-512 cores (64-row tiles), fp32, scatter / gather: 2:4 at 4096^2 0.46-0.86 for batches 32-256, 90%
# 0.79 at one tile and 1.0-1.1 at two or four, 99% at one tile 0.86 (16384^2), 0.92 (8192^2), 1.04 (4096^2)
# and 1.3-1.8 for 1024 x 16384 (a 16384-wide gradient), at two or more tiles 1.16-1.44.
SCATTER_DENSITY = 0.25


def scatters_grad_input(plan: CppPlan, batch: int, dtype: torch.dtype, walk: str | None = None) -> bool:
    """Whether ``dy @ W`` of a batch of at least one vector (of ``dtype``, as the kernels read it) walks W's
    rows (scatter) rather than W^T's:
    ``walk`` ``"rows"`` or ``"columns"`` asks for one (the tuner's candidates), None chooses by the rule
    above. Plans of blocks, and values stored out of row order, walk W^T."""
    if plan.order is not None or plan.block is not None or walk == "columns":
        return False
    out, inn = plan.shape
    if walk == "rows" or plan.cols.numel() >= SCATTER_DENSITY * out * inn:
        return True
    return batch <= _tiling(KERNEL_TYPES[dtype][0])[0] and inn <= out


def _scatter_product(src: torch.Tensor, values: torch.Tensor, plan: CppPlan) -> torch.Tensor:
    """``src @ W`` for a batch under one vector, walking W's rows in stored order (``sparsec_rows_spmm_scatter``)."""
    b, (n_rows, n_out) = src.shape[0], plan.shape
    scalar, io = KERNEL_TYPES[src.dtype]
    lib = _library(scalar, io, INDEX_TYPES[plan.cols.dtype], "int32_t")
    threads = torch.get_num_threads()
    out, acc = src.new_empty(b, n_out), _scratch(threads * b * n_out, src)
    lib.sparsec_rows_spmm_scatter(
        src.data_ptr(),
        values.data_ptr(),
        plan.offsets.data_ptr(),
        plan.cols.data_ptr(),
        out.data_ptr(),
        acc.data_ptr(),
        b,
        n_rows,
        n_out,
        threads,
    )
    return out


def _scatter_tiles_product(src: torch.Tensor, values: torch.Tensor, plan: CppPlan) -> tuple[torch.Tensor, Tiles]:
    """``src @ W`` for a batch of at least one vector over W's rows (``sparsec_rows_spmm_scatter_tiles``), and
    the batch tiles of ``src`` it made."""
    b, (n_rows, n_out) = src.shape[0], plan.shape
    scalar, io = KERNEL_TYPES[src.dtype]
    lib = _library(scalar, io, INDEX_TYPES[plan.cols.dtype], "int32_t")
    tile = _tiling(scalar)[0]
    padded = -(-b // tile) * tile
    out = src.new_empty(b, n_out)
    src_t, out_t = _work(lib, padded * n_rows, src), _scratch(padded * n_out, src)  # held: the call reads them
    lib.sparsec_rows_spmm_scatter_tiles(
        src.data_ptr(), values.data_ptr(), plan.offsets.data_ptr(), plan.cols.data_ptr(), out.data_ptr(),
        src_t.data_ptr(), out_t.data_ptr(), b, n_rows, n_out, torch.get_num_threads(),
    )  # fmt: skip
    return out, Tiles(src_t, (src.dtype, src.shape))


def cpp_grad_input(
    plan: CppPlan, dy: torch.Tensor, values: torch.Tensor, micro_tiles: bool = True, walk: str | None = None
) -> torch.Tensor:
    """``dy @ W``."""
    return cpp_grad_input_tiles(plan, dy, values, micro_tiles, walk)[0]


def cpp_grad_values(
    plan: CppPlan,
    dy: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    dy_tiles: Tiles | None = None,
    x_tiles: Tiles | None = None,
    micro_tiles: bool = True,
) -> torch.Tensor:
    """``(dy^T @ x)`` at the kept positions, in stored value order: from the step's batch tiles of ``dy`` and
    ``x`` where both are given (made of these very tensors) and the layer is sparse enough that copying
    costs more than the dots (``TILE_DOTS_DENSITY``), else over feature-major copies of its own."""
    g, xs = _inputs(dy, x)
    b, n_rows = g.shape
    n_x = xs.shape[1]
    grad = g.new_empty(values.numel())
    blocks = _block_kernels(plan, g, micro_tiles)
    if blocks is not None:  # micro-GEMMs per stored block over feature-major copies
        ld = blocks.sparsec_dots_ld(b)
        dy_t, x_t = _work(blocks, ld * n_rows, g), _work(blocks, ld * n_x, g)  # held: the call reads them
        blocks.sparsec_block_sddmm(
            g.data_ptr(),
            xs.data_ptr(),
            plan.block_offsets.data_ptr(),
            plan.block_cols.data_ptr(),
            grad.data_ptr(),
            dy_t.data_ptr(),
            x_t.data_ptr(),
            b,
            plan.block_offsets.numel() - 1,
            *plan.block,
            n_x,
            torch.get_num_threads(),
        )
        return grad.view(values.shape).to(values.dtype)
    lib = _library(*KERNEL_TYPES[g.dtype], INDEX_TYPES[plan.cols.dtype], _slot_type(plan.order))
    if dots_read_tiles(plan, values) and _made_of(dy_tiles, g) and _made_of(x_tiles, xs):
        lib.sparsec_rows_sddmm_tiles(
            dy_tiles.data.data_ptr(),
            x_tiles.data.data_ptr(),
            plan.offsets.data_ptr(),
            plan.cols.data_ptr(),
            _ptr(plan.order),
            grad.data_ptr(),
            b,
            n_rows,
            n_x,
            torch.get_num_threads(),
        )
        return grad.view(values.shape).to(values.dtype)
    ld = 0 if b == 1 else lib.sparsec_dots_ld(b)  # padded: feature rows do not alias in the caches (1: no copies)
    dy_t, x_t = _work(lib, ld * n_rows, g), _work(lib, ld * n_x, g)  # held: the call reads their storage
    lib.sparsec_rows_sddmm(
        _ptr(g),
        _ptr(xs),
        _ptr(plan.offsets),
        _ptr(plan.cols),
        _ptr(plan.order),
        _ptr(grad),
        _ptr(dy_t),
        _ptr(x_t),
        b,
        n_rows,
        n_x,
        torch.get_num_threads(),  # torch's intra-op count (torch.set_num_threads holds)
    )
    return grad.view(values.shape).to(values.dtype)


def _rows_io(plan: CppPlan, dtype: torch.dtype) -> tuple[ctypes.CDLL, torch.dtype]:
    dt = dtype if dtype in KERNEL_TYPES else torch.float32  # float16: through float32
    return _library(*KERNEL_TYPES[dt], INDEX_TYPES[plan.cols.dtype], _slot_type(plan.order)), dt


def _rows_copy(kernel, src: torch.Tensor, plan: CppPlan, dst: torch.Tensor) -> None:
    """``kernel(SRC, offsets, cols, order, DST, n_rows, n_cols, threads)``: densify or sample over W's rows."""
    kernel(src.data_ptr(), plan.offsets.data_ptr(), plan.cols.data_ptr(), _ptr(plan.order), dst.data_ptr(),
           *plan.shape, torch.get_num_threads())  # fmt: skip


def cpp_densify(
    plan: CppPlan, values: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense ``[out, in]`` weight in ``dtype``: zeros, and the kept values (``sparsec_rows_densify``),
    written into ``out`` where given (contiguous, of the kernels' dtype)."""
    lib, dt = _rows_io(plan, dtype)
    v = values.to(dt).contiguous()
    w = v.new_empty(plan.shape) if out is None or out.dtype != dt else out
    _rows_copy(lib.sparsec_rows_densify, v, plan, w)
    return w if dt == dtype else w.to(dtype)


def cpp_sample(plan: CppPlan, dense: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The kept positions of the dense ``[out, in]`` product ``dense``, in stored value order, as ``values``."""
    lib, dt = _rows_io(plan, dense.dtype)
    d = dense.to(dt).contiguous()
    grad = d.new_empty(values.numel())
    _rows_copy(lib.sparsec_rows_sample, d, plan, grad)
    return grad.view(values.shape).to(values.dtype)


@functools.cache
def _select_library() -> ctypes.CDLL:
    lib = load(render("cpu/select.cpp.jinja"))
    lib.sparsec_best_in_row.argtypes = [_P, _I64, _I64, ctypes.c_float, _P, _INT]
    lib.sparsec_best_in_row.restype = _I64
    lib.sparsec_best_per_row.argtypes = [_P, _I64, _I64, _P, _P, _P, _P, _INT]
    lib.sparsec_best_per_row.restype = None
    lib.sparsec_merge_kept.argtypes = lib.sparsec_merge_kept32.argtypes = [_P, _P, _I64, _P, _I64, _P, _P]
    lib.sparsec_merge_kept.restype = _I64
    lib.sparsec_merge_kept_int32.argtypes = [_P, _P, _I64, _P, _I64, _P, _P]
    lib.sparsec_merge_kept_int32.restype = _I64
    return lib


def cpp_merge_kept(
    kept: torch.Tensor, survives: torch.Tensor, grown: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ascending positions after an update: the surviving ``kept`` and ``grown``, in ``kept``'s dtype where
    it is int32, else int64; each one's old slot in ``kept``, -1 for a new one: int32 where the slots fit),
    merged in one pass by the generated kernel."""
    int32_positions = kept.dtype == torch.int32  # every position fits: the layer's update_positions
    kept = kept.contiguous() if int32_positions else kept.to(torch.int64).contiguous()
    grown = grown.to(torch.int64).contiguous()
    if grown.numel() > 1 and not bool((grown[1:] > grown[:-1]).all()):  # a policy may grow out of order
        grown = grown.sort().values
    flags = survives.to(torch.bool).contiguous().view(torch.uint8)  # one byte, 0 or 1
    n = int(survives.count_nonzero()) + grown.numel()  # a bool sum() would cast to int64 first: 8 B a slot
    int32_slots = kept.numel() < 2**31  # half the bytes the remaps of values and state read
    flat, src = torch.empty(n, dtype=kept.dtype), torch.empty(n, dtype=torch.int32 if int32_slots else torch.int64)
    lib = _select_library()
    if int32_positions:  # fewer than 2^31 positions: fewer slots too
        merge = lib.sparsec_merge_kept_int32
    else:
        merge = lib.sparsec_merge_kept32 if int32_slots else lib.sparsec_merge_kept
    w = merge(
        kept.data_ptr(), flags.data_ptr(), kept.numel(), grown.data_ptr(), grown.numel(), flat.data_ptr(),
        src.data_ptr(),
    )  # fmt: skip
    assert w == n, (w, n)
    return flat, src


def cpp_best_in_row(scores: torch.Tensor, k: int, floor: float = -float("inf")) -> torch.Tensor:
    """Ascending indices of the ``k`` largest entries of the 1-D float32 ``scores`` above ``floor`` (NaN
    never taken; fewer when fewer qualify); ties at the k-th go to the lower index."""
    s = scores.contiguous()
    out = torch.empty(max(0, min(k, s.numel())), dtype=torch.int64)
    n = _select_library().sparsec_best_in_row(
        s.data_ptr(), s.numel(), k, floor, out.data_ptr(), torch.get_num_threads()
    )
    return out[:n]


def cpp_best_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Ascending flat indices (into ``scores.view(-1)``) of the ``k[r]`` largest entries above -inf of each
    row ``r`` of the 2-D float32 ``scores`` (NaN never taken; fewer where fewer qualify), ties to the lower
    column: ``selection.best_per_row``'s choice, as indices, by the generated kernel (rows in parallel)."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.is_cuda or k.numel() != scores.shape[0]:
        raise ValueError(f"cpp_best_per_row: 2-D float32 CPU scores and a k per row; got {scores.shape}, {k.shape}")
    s = scores.contiguous()
    need = k.to(torch.int64).clamp(min=0, max=s.shape[1]).contiguous()
    at = torch.cumsum(need, 0) - need  # each row's first output slot
    out = torch.empty(int(need.sum()), dtype=torch.int64)
    count = torch.empty(s.shape[0], dtype=torch.int64)
    _select_library().sparsec_best_per_row(
        s.data_ptr(), s.shape[0], s.shape[1], need.data_ptr(), at.data_ptr(), out.data_ptr(), count.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if bool((count < need).any()):  # rows with fewer qualifying entries than asked: their slots' tails are unset
        slot = torch.arange(out.numel()) - torch.repeat_interleave(at, need)
        out = out[slot < torch.repeat_interleave(count, need)]
    return out


@functools.cache
def _grow_library() -> ctypes.CDLL:
    lib = load(render("cpu/grow.cpp.jinja"))
    lib.sparsec_grow_layer_wide.argtypes = [_P, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _P, _P, _INT]
    lib.sparsec_grow_layer_wide.restype = _I64
    lib.sparsec_grow_per_unit.argtypes = [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT]
    lib.sparsec_grow_per_unit.restype = None
    return lib


def _scan_operands(dy, x, listed, stays, rows):
    """The grow scans' operands: dY transposed and X in float32, ``listed``'s int32 compressed rows (the
    caller's ``rows`` where they hold it), and ``stays`` as bytes (or None)."""
    dyt, xs = dy.t().float().contiguous(), x.float().contiguous()
    if rows is None or rows[1].numel() != listed.numel():
        rows = compressed_rows_of(listed, dy.shape[1], x.shape[1])
    eoff, ecol = (t.to(torch.int32).contiguous().view(-1) for t in rows)
    flags = None if stays is None else stays.contiguous().view(torch.uint8)  # bool: one byte, 0 or 1
    return dyt, xs, eoff, ecol, flags


def cpp_grow_layer_wide(
    dy: torch.Tensor,
    x: torch.Tensor,
    listed: torch.Tensor,
    k: int,
    stays: torch.Tensor | None = None,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The ``k`` best positions of ``|dy^T x|`` (``[out, in]`` flat, ascending) outside the sorted flat
    positions ``listed`` (where ``stays`` is given, only those it flags: the kept after a drop), ties to the
    lower index, with their scores and whether every score was finite: the fused kernel of
    ``kernels/cpu/grow.cpp.jinja`` (the product is never stored; ``listed`` goes to it as int32 rows:
    ``rows``, int32 offsets and columns of ``listed``, where the caller holds them)."""
    o, inn = dy.shape[1], x.shape[1]
    dyt, xs, eoff, ecol, flags = _scan_operands(dy, x, listed, stays, rows)
    flat = torch.empty(max(0, k), dtype=torch.int64)
    score = torch.empty(max(0, k), dtype=torch.float32)
    bad = torch.zeros(1, dtype=torch.int64)
    n = _grow_library().sparsec_grow_layer_wide(
        dyt.data_ptr(), xs.data_ptr(), dy.shape[0], o, inn, eoff.data_ptr(), ecol.data_ptr(),
        None if flags is None else flags.data_ptr(), k, flat.data_ptr(), score.data_ptr(), bad.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return flat[:n], score[:n], int(bad) == 0


def cpp_grow_per_unit(
    dy: torch.Tensor,
    x: torch.Tensor,
    listed: torch.Tensor,
    need: torch.Tensor,
    width: int,
    stays: torch.Tensor | None = None,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Each unit ``u``'s ``need[u]`` best positions of ``|dy^T x|`` outside ``listed`` (as
    ``cpp_grow_layer_wide``: where ``stays`` is given, only those it flags), ascending flat, ties to the lower
    column, fewer where a unit has fewer eligible; with their scores and whether every score was finite. Units
    are ``width`` consecutive columns of a row, numbered row by row (fan-in rows: the row's width; N:M groups:
    M): one fused scan of ``kernels/cpu/grow.cpp.jinja`` with a heap per unit."""
    o, inn = dy.shape[1], x.shape[1]
    if width <= 0 or inn % width or need.numel() != o * (inn // width):
        raise ValueError(
            f"cpp_grow_per_unit: units of {width} columns must tile the {o} x {inn} gradient's rows, with a "
            f"need per unit ({o * (inn // max(width, 1))}); got {need.numel()}"
        )
    dyt, xs, eoff, ecol, flags = _scan_operands(dy, x, listed, stays, rows)
    want = need.to(torch.int64).clamp(min=0, max=width).contiguous()
    at = torch.cumsum(want, 0) - want  # each unit's first output slot
    flat, score = torch.empty(int(want.sum()), dtype=torch.int64), torch.empty(int(want.sum()), dtype=torch.float32)
    count, bad = torch.empty(want.numel(), dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    _grow_library().sparsec_grow_per_unit(
        dyt.data_ptr(), xs.data_ptr(), dy.shape[0], o, inn, width, eoff.data_ptr(), ecol.data_ptr(),
        None if flags is None else flags.data_ptr(), want.data_ptr(), at.data_ptr(), flat.data_ptr(),
        score.data_ptr(), count.data_ptr(), bad.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if bool((count < want).any()):  # units with fewer eligible positions than asked: their slots' tails are unset
        slot = torch.arange(flat.numel()) - torch.repeat_interleave(at, want)
        held = slot < torch.repeat_interleave(count, want)
        flat, score = flat[held], score[held]
    return flat, score, int(bad) == 0
