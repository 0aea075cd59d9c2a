"""What every storage format shares: the ``Layout`` of a layer, the ``Format`` and ``Strategy`` bases.

A ``Format`` owns everything about one storage structure (one spec type): its layout and index
buffers, encode/decode, its symbolic shapes, units, divisibility rules and index bytes, its example
kernel cases, and the kernel ``Strategy`` it picks for a spec. A ``Strategy`` owns a family of
kernels: their templates per program, default tiles, dot precision, index plan, launch grids and
arguments, and the shape of the grow step's output. The IR, the passes, codegen and the runtime never
branch on a spec type or a format name (``tests/unit/test_formats.py``); they ask the format. (Policies
defined for one structure, such as srigl on fan-in, check their spec type themselves.)

Every layout is described in the same terms:

- *items* are what is kept or dropped: single weights, or whole ``bh x bw`` blocks for block
  sparsity. They live on an item grid of ``rows x cols`` (the weight, or its block grid), and an
  item's *flat index* is ``row * cols + col`` on that grid.
- *units* are the ranges of flat indices whose kept count is fixed: the whole layer
  (unstructured, block), one group of M (N:M), one row (constant fan-in). Units are contiguous
  in flat index, so ``unit = flat // unit_size``.
- values are stored in ascending flat order, one item after another; each format's module says
  its values shape and integer buffers.

``encode`` and ``decode`` convert between sorted flat item positions and the buffers; nothing
here ever builds a dense ``[out, in]`` tensor except ``to_dense`` (tests, plots, export).
"""

from __future__ import annotations

import bisect
import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch

from sparsec.errors import ShapeError
from sparsec.formats.sampling import random_subsets
from sparsec.lazy import lazy_module
from sparsec.spec.specs import Spec

sympy = lazy_module("sympy")  # 30 MB and most of a second: loaded by the first symbolic shape, rule or cost


class _Symbols:
    """The symbols every IR shape, rule and cost is written in (batch rows, out features, in features) and
    the kept-count function, made at first use: building or running a layer never loads sympy; lowering
    and the explainer do. They live here, below the IR, because formats write theirs (``SYM.OUT``)."""

    @functools.cached_property
    def _sizes(self) -> tuple:
        return sympy.symbols("B O I", integer=True, positive=True)

    @property
    def BATCH(self):  # noqa: N802 - reads as the symbol it is
        return self._sizes[0]

    @property
    def OUT(self):  # noqa: N802
        return self._sizes[1]

    @property
    def IN(self):  # noqa: N802
        return self._sizes[2]

    @functools.cached_property
    def kept(self) -> type:
        """``kept_count`` as a sympy function ``kept(n, s)``: evaluated with Python floats exactly as layouts
        count."""

        class kept(sympy.Function):  # noqa: N801 - reads as a formula: kept(n, s)
            @classmethod
            def eval(cls, n, s):
                if n.is_Integer and s.is_Number:
                    return sympy.Integer(kept_count(int(n), float(s)))
                return None

        return kept


SYM = _Symbols()

PROGRAMS = ("forward", "grad_input", "grad_values", "grow_scores")


def kept_count(n: int, sparsity: float) -> int:
    """Items a layer (or row) of ``n`` keeps at ``sparsity``: ``n - floor(sparsity * n)``, at least 1."""
    return max(1, n - math.floor(sparsity * n))


def kept_expr(n: sympy.Expr, sparsity: float) -> sympy.Expr:
    """The symbolic kept count of ``n`` items at ``sparsity`` (``n`` itself when nothing is dropped)."""
    return SYM.kept(n, sympy.Float(sparsity)) if sparsity else n


def divisors(n: int, limit: int = 64) -> list[int]:
    """Divisors of ``n`` from 2 to ``limit``: the choices an error message suggests."""
    return [d for d in range(2, min(n, limit) + 1) if n % d == 0]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The smallest power of two that is at least ``n`` and ``floor`` (a ``tl.dot`` side)."""
    p = floor
    while p < n:
        p *= 2
    return p


# --- layouts -------------------------------------------------------------------------------------


class LayoutKey(NamedTuple):
    """What identifies a layout, typed as the custom ops take it (``str``, ``int``, ``int``):
    ``formats.layout_of(*key)`` gives a ``Layout.key``'s layout back, ``formats.layout_of_storage``
    an ``op_key``'s, each parsed once per distinct key."""

    spec: str  # canonical spec text (``key``), or a structure without its kept count (``op_key``)
    out_features: int
    in_features: int


@dataclass(frozen=True)
class Layout:
    """One spec on one weight shape: the item grid, the units, the values shape and the buffers."""

    format: Format = field(repr=False, compare=False)  # follows from spec
    spec: Spec
    out_features: int
    in_features: int
    grid: tuple[int, int]  # item grid (rows, cols)
    item: tuple[int, int]  # item shape: (1, 1) for weights, (bh, bw) for blocks
    unit_size: int  # flat items per unit
    kept_per_unit: int
    values_shape: tuple[int, ...]
    buffers: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]  # (name, dtype, shape)
    # the storage's canonical spec (``Format.storage_spec``): plans and kernels are keyed by it, so layouts
    # that store the same (a 90% spec and the count it keeps) share them
    key: LayoutKey = field(init=False, repr=False, compare=False)
    # what the custom ops take: the structure without its kept count (``Format.family``), which the
    # values' size carries; plain attributes, not properties: torch.compile reads them as constants
    op_key: LayoutKey = field(init=False, repr=False, compare=False)
    index_names: tuple[str, ...] = field(init=False, repr=False, compare=False)  # the buffers' names, in order

    def __post_init__(self) -> None:
        family = self.format.family(self.spec)
        storage = self.format.storage_spec(family, self.out_features, self.in_features, self.nnz)
        object.__setattr__(self, "key", LayoutKey(str(storage), self.out_features, self.in_features))
        object.__setattr__(self, "op_key", LayoutKey(family, self.out_features, self.in_features))
        object.__setattr__(self, "index_names", tuple(name for name, _, _ in self.buffers))

    @property
    def n_units(self) -> int:
        return self.grid[0] * self.grid[1] // self.unit_size

    @property
    def n_items(self) -> int:
        return self.n_units * self.kept_per_unit

    @property
    def nnz(self) -> int:
        return self.n_items * self.item[0] * self.item[1]

    # --- buffers <-> sorted flat item positions --------------------------------------------------

    def encode(self, flat: torch.Tensor, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Index buffers for sorted flat item positions ``flat`` (int64 ``[n_items]``), written into ``out``
        (buffers of this layout, by name) where given: no second copy of the index exists meanwhile."""
        return self.format.encode(self, flat, out)

    def decode(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sorted flat item positions (int64) from the index buffers."""
        return self.format.decode(self, buffers)

    def decode_int32(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``decode`` as int32 (half the bytes), from the format's compressed rows; None where it holds none
        or the item grid has 2^31 positions or more."""
        rows = self.format.compressed_rows(self, buffers)
        if rows is None or self.grid[0] * self.grid[1] >= 2**31:
            return None
        return decode_rows(self, *rows, dtype=torch.int32)

    # --- invariants ------------------------------------------------------------------------------

    def check_positions(self, flat: torch.Tensor, what: str = "mask") -> None:
        """Raise ``ShapeError`` unless ``flat`` is a sorted, unique set with exact per-unit counts."""
        total = self.grid[0] * self.grid[1]
        if flat.numel() != self.n_items:
            raise ShapeError(
                f"{what} keeps {flat.numel()} items; spec {self.spec} on {self.shape_text} keeps {self.n_items}"
            )
        if flat.numel() and (flat.min() < 0 or flat.max() >= total):
            raise ShapeError(f"{what} has positions outside the {self.grid[0]}x{self.grid[1]} item grid")
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            raise ShapeError(f"{what} positions are not strictly increasing (duplicates or unsorted)")
        if self.n_units == 1:  # one unit (the layer): its count is the total, checked above
            return
        counts = torch.bincount(flat // self.unit_size, minlength=self.n_units)
        bad = (counts != self.kept_per_unit).nonzero().flatten()
        if bad.numel():
            u = int(bad[0])
            raise ShapeError(
                f"{what} breaks spec {self.spec}: unit {u} ({self.unit_name}) keeps {int(counts[u])} "
                f"instead of {self.kept_per_unit} ({bad.numel()} units wrong)"
            )

    @property
    def unit_name(self) -> str:
        return self.format.unit_name

    @property
    def shape_text(self) -> str:
        return f"weight {self.out_features}x{self.in_features}"

    # --- construction helpers --------------------------------------------------------------------

    def random_positions(self, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniformly random sorted flat positions satisfying the spec (the RigL initial topology), drawn in
        O(kept) time and memory (``formats.sampling``): never a tensor of every position."""
        return random_subsets(self.n_units, self.unit_size, self.kept_per_unit, generator).to(device)

    def element_positions(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat weight positions (``row * in + col``) of every stored value, in value order."""
        if self.item == (1, 1):
            return flat
        bh, bw = self.item
        br, bc = flat // self.grid[1], flat % self.grid[1]
        r = (br * bh)[:, None, None] + torch.arange(bh, device=flat.device)[None, :, None]
        c = (bc * bw)[:, None, None] + torch.arange(bw, device=flat.device)[None, None, :]
        return (r * self.in_features + c).reshape(-1)

    def item_positions_from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Sorted flat item positions of a dense boolean ``[out, in]`` mask (checked)."""
        mask = mask.reshape(self.out_features, self.in_features).bool()
        if self.item != (1, 1):
            bh, bw = self.item
            blocks = mask.view(self.grid[0], bh, self.grid[1], bw)
            kept = blocks.any(dim=(1, 3))
            if not bool((blocks.all(dim=(1, 3)) == kept).all()):
                raise ShapeError(f"mask has partly kept {bh}x{bw} blocks; spec {self.spec} keeps whole blocks")
            mask = kept
        flat = mask.reshape(-1).nonzero().flatten()
        self.check_positions(flat)
        return flat

    def to_dense(self, values: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(self.out_features * self.in_features, dtype=values.dtype, device=values.device)
        dense[self.element_positions(flat)] = values.reshape(-1)
        return dense.view(self.out_features, self.in_features)

    def values_from_dense(self, dense: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return dense.reshape(-1)[self.element_positions(flat)].view(self.values_shape)


def item_scores(layout: Layout, dense_scores: torch.Tensor) -> torch.Tensor:
    """Per-item scores on the item grid: the scores themselves, or their block means."""
    if layout.item == (1, 1):
        return dense_scores
    bh, bw = layout.item
    return dense_scores.reshape(-1, bh, layout.grid[1], bw).mean(dim=(1, 3))


def offsets(index: torch.Tensor, n: int) -> torch.Tensor:
    """int64 offsets ``[n + 1]`` of ``n`` rows from the row of every item (compressed-row starts)."""
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    ptr[1:] = torch.bincount(index, minlength=n).cumsum(0)
    return ptr


def int32_index(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` as int32 (what kernels and index buffers hold), refused with a clear error where it would wrap."""
    if t.numel() and int(t.max()) > 2**31 - 1:
        raise ShapeError(
            f"{what} reach {int(t.max())}, past int32 (2^31 - 1): split the layer (more layers, or fewer kept "
            f"weights per layer)"
        )
    return t.to(torch.int32)


_ROWS_CHUNK = 1 << 18  # items converted at once by encode_rows / decode_rows: their int64 temporaries


def encode_rows(
    layout: Layout, flat: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed rows of the item grid: int32 row offsets ``[rows + 1]`` and columns ``[n_items]``."""
    return compressed_rows_of(flat, *layout.grid, out=out)


def compressed_rows_of(
    flat: torch.Tensor, n_rows: int, n_cols: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 row offsets ``[n_rows + 1]`` and columns of sorted flat positions ``row * n_cols + col`` (into
    ``out`` where given). The offsets are a binary search of every row's start; the columns are computed a
    chunk at a time, so no int64 temporary of the positions' size exists beside ``flat`` itself."""
    starts = torch.arange(n_rows + 1, device=flat.device, dtype=torch.int64) * n_cols
    if flat.dtype == torch.int32:  # the positions fit, so do the rows' starts: searchsorted would widen flat
        starts = starts.to(torch.int32)
    ptr = int32_index(torch.searchsorted(flat, starts), "row offsets")
    if out is None:
        out = (ptr, torch.empty(flat.shape, dtype=torch.int32, device=flat.device))
    else:
        out[0].copy_(ptr)
    chunked_into(out[1].view(-1), flat, lambda part: part % n_cols)
    return out


def chunked_into(dst: torch.Tensor, flat: torch.Tensor, fn) -> torch.Tensor:
    """``dst[i] = fn(flat[i])`` computed a chunk at a time (``fn``'s int64 temporaries are a chunk's)."""
    for at in range(0, flat.numel(), _ROWS_CHUNK):
        dst[at : at + _ROWS_CHUNK] = fn(flat[at : at + _ROWS_CHUNK])
    return dst


def decode_rows(
    layout: Layout, offsets: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Sorted flat item positions (``dtype``: int32 only where they fit) from compressed rows of the item
    grid, a chunk of rows at a time (the int64 temporaries are a chunk's, not the layer's)."""
    n_rows, n_cols = layout.grid
    ptr = offsets.to(torch.int64)
    if cols.device.type != "cpu":  # device memory is not the constraint there: one pass of few kernels
        rows = torch.repeat_interleave(torch.arange(n_rows, device=cols.device), ptr.diff())
        return (rows * n_cols + cols.to(torch.int64)).to(dtype)
    flat = torch.empty(cols.shape, dtype=dtype, device=cols.device)
    ends = ptr[1:].tolist() if n_rows else []
    r0 = 0
    while r0 < n_rows:  # rows r0 .. r1 hold at most a chunk of items (or one row, if longer)
        a = ends[r0 - 1] if r0 else 0
        r1 = max(r0 + 1, bisect.bisect_right(ends, a + _ROWS_CHUNK, lo=r0))
        b = ends[r1 - 1]
        rows = torch.repeat_interleave(torch.arange(r0, r1, device=cols.device), ptr[r0 + 1 : r1 + 1] - ptr[r0:r1])
        torch.add(rows * n_cols, cols[a:b], out=flat[a:b])
        r0 = r1
    return flat


def row_plan(layout: Layout, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The index plan of the row-walking kernels, O(kept items), named by kernel parameter.

    ``PTR``/``IDX``: row offsets and column of every item (stored order); ``ROWS``: row of every
    item; ``PTR_T``/``IDX_T``/``PERM_T``: the compressed rows of ``W^T`` (W's columns), the W row
    of each of its items and the stored slot it reads, so ``dX = dY @ W`` gathers instead of
    scattering with atomics. Items are weights, or blocks of the block grid.
    """
    rows_n, cols_n = layout.grid
    rows, cols = flat // cols_n, flat % cols_n
    perm_t = (cols * rows_n + rows).argsort()
    i32 = torch.int32
    return {
        "PTR": int32_index(offsets(rows, rows_n), "row offsets"),
        "IDX": cols.to(i32),
        "ROWS": rows.to(i32),
        "PTR_T": int32_index(offsets(cols, cols_n), "column offsets"),
        "IDX_T": rows[perm_t].to(i32),
        "PERM_T": int32_index(perm_t, "stored slots"),
    }


# --- kernel strategies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelCall:
    """What a strategy adds to one kernel launch: the grid, and the sizes and constexprs it binds by name."""

    grid: tuple[int, ...]
    args: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy(ABC):
    """A family of kernels for the four programs, parameterised by one spec's numbers.

    Kernel parameters are bound by name. The launcher supplies ``X``, ``DZ``, ``VALUES``, ``BIAS``,
    ``DROP``, ``OUT``, ``KC`` and the sizes ``B``, ``O``, ``KIN``; ``plan`` supplies index tensors,
    the tile its constexprs, and ``call`` the rest (overriding a tile entry of the same name).
    """

    name: ClassVar[str]  # the IR's "strategy" attribute
    templates: ClassVar[dict[str, tuple[str, dict]]]  # program -> (template, fixed template parameters)
    dense_product: ClassVar[bool] = False  # products execute the dense FLOPs (decompressed before tl.dot)
    tensor_cores: ClassVar[bool] = True  # products use tl.dot (every grow step does: it scores a dense tile)
    why: str  # the reason the format picked this strategy (sparsec explain)

    def template(self, program: str) -> tuple[str, dict]:
        return self.templates[program]

    def padding(self, tile: dict[str, int]) -> float:
        """Executed over useful products of a tile (> 1 where a kernel pads items to its dot's minimum)."""
        return 1.0

    def precision(self, program: str, dtype: str) -> str:
        """How a product's tl.dot multiplies: "tensor" cores (fp16, bf16, TF32) or "ieee" fp32 on FMA units.

        fp32 is IEEE (torch's "highest" matmul precision).
        """
        return "ieee" if dtype in ("fp32", "fp64") else "tensor"

    @abstractmethod
    def tiles(self, program: str, dtype: str) -> dict[str, int]:
        """Default tile sizes (kernel constexprs) of one program's product."""

    def tile_space(self, program: str, dtype: str) -> dict[str, tuple[int, ...]]:
        """The sizes the autotuner may give each tunable tile constexpr of one program's kernel (every
        value valid for the template; the default's among them); a size not named keeps its default.
        grow_scores is not tuned: its segment width is the grow step's unit."""
        return {}

    # programs whose kernels walk a two-axis tile grid and take GROUP (grad_values' always takes SPLIT)
    grouped: ClassVar[tuple[str, ...]] = ("forward", "grad_input")

    def grid_space(self, program: str) -> dict[str, tuple[int, ...]]:
        """The sizes the autotuner may give the constexprs that shape a program's grid (``runtime.launch``):
        ``GROUP`` (tile rows walked together, 1: the plain grid) and grad_values' ``SPLIT`` (batch shares
        summed apart, 1: none). Their defaults are 1; grow_scores has neither (not tuned)."""
        space = {"GROUP": (1, 4, 8)} if program in self.grouped else {}
        return {**space, "SPLIT": (1, 2, 4, 8)} if program == "grad_values" else space

    def plan(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The device-side index tensors the kernels read, by parameter name, built once per mask."""
        return row_plan(layout, layout.decode(buffers))

    @abstractmethod
    def call(
        self,
        program: str,
        layout: Layout,
        tile: dict[str, int],
        plan: dict[str, torch.Tensor],
        batch: int,
        rows: int | None = None,
    ) -> KernelCall:
        """The grid and the format's named sizes and constexprs of one program's launch; ``rows`` is the
        number of item-grid rows a grow_scores launch covers (one chunk of the grow step), None all."""

    @property
    def grows_on_kernel(self) -> bool:
        """Whether the grow step runs the generated grow_scores kernel (else the chunked CPU path)."""
        return True

    def grow_segment(self, tile: dict[str, int]) -> int | None:
        """Width of the segments grow_scores keeps its best candidates of; None: it scores whole items."""
        return tile["BLOCK_K"]

    def grow_output(
        self, layout: Layout, tile: dict[str, int], kc: int, rows: int, listed: int | None = None
    ) -> tuple[tuple[int, ...], torch.dtype, float]:
        """(shape, dtype, poison) of a grow_scores launch over ``rows`` output rows: int64 keys
        ``[rows, segments, kc]``, or ``[listed, BLOCK_O, BLOCK_K // segment, kc]`` for a launch over
        ``listed`` tiles; -2 is neither a key (>= 0) nor the kernel's empty place (-1)."""
        seg = self.grow_segment(tile)
        if listed is not None:
            return (listed, tile["BLOCK_O"], tile["BLOCK_K"] // seg, kc), torch.int64, -2
        return (rows, cdiv(layout.in_features, seg), kc), torch.int64, -2


# --- formats -------------------------------------------------------------------------------------


class Format(ABC):
    """Everything about one storage structure; one instance per spec type (``formats.format_of``)."""

    name: ClassVar[str]  # the IR's "format" attribute: "csr", "nm", "bsr", "ell"
    spec_type: ClassVar[type]
    unit_name: ClassVar[str] = "the layer"  # what a unit is, in error messages
    # Example (spec, out, in) kernel cases on shapes that are not multiples of any tile: the
    # interpreter tests, the AOT tests and bench/aot_kernels.py run their concatenation.
    cases: ClassVar[tuple[tuple[str, int, int], ...]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # storage
    def weight_layout(
        self,
        spec,
        out_features: int,
        in_features: int,
        unit_size: int,
        kept_per_unit: int,
        values_shape: tuple[int, ...],
        buffers,
    ) -> Layout:
        """A layout whose items are single weights (every format but block's): the grid is the weight."""
        return Layout(
            format=self,
            spec=spec,
            out_features=out_features,
            in_features=in_features,
            grid=(out_features, in_features),
            item=(1, 1),
            unit_size=unit_size,
            kept_per_unit=kept_per_unit,
            values_shape=values_shape,
            buffers=buffers,
        )

    @abstractmethod
    def layout(self, spec, out_features: int, in_features: int) -> Layout:
        """The layout of ``spec`` on an ``out x in`` weight (``check_layer`` has passed)."""

    # what the custom ops take: a density change (gmp, snfs) changes tensor sizes, never a constant
    # of a compiled graph
    family_word: ClassVar[str | None]  # the first word of ``family``'s text (None: the spec's own text)
    # tensor ("values" or an index buffer) -> the dim whose size is the kept count (what gmp changes)
    count_dims: ClassVar[dict[str, int]]

    def family(self, spec) -> str:
        """``spec`` without its kept count (``unstructured``, ``block(16x16)``, ``fanin``; N:M has none)."""
        return self.family_word

    @abstractmethod
    def storage_spec(self, family: str, out_features: int, in_features: int, n_values: int):
        """The canonical spec of ``family`` storing ``n_values`` values on an ``out x in`` weight."""

    @abstractmethod
    def encode(
        self, layout: Layout, flat: torch.Tensor, out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Index buffers of sorted flat item positions (written into ``out``'s tensors where given)."""

    @abstractmethod
    def decode(self, layout: Layout, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sorted flat item positions of the index buffers."""

    def compressed_rows(
        self, layout: Layout, buffers: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """int32 row offsets ``[out + 1]`` and columns of the kept weights, in stored order (values stored
        row-major), where the buffers hold them or give them without decoding; None otherwise (the plan
        kernels then read the decoded positions)."""
        return None

    # symbolic, in OUT and IN
    @abstractmethod
    def values_shape(self, spec) -> tuple[sympy.Expr, ...]:
        """Symbolic shape of the stored values."""

    def units(self, spec) -> sympy.Expr:
        """Number of units whose kept count is fixed."""
        return sympy.Integer(1)

    def constraints(self, spec) -> list[tuple[str, sympy.Expr]]:
        """(rule, expression that must be zero or true) in terms of OUT and IN."""
        return []

    def check(self, spec, out_features: int, in_features: int, where: str) -> None:
        """Raise ``ShapeError`` naming ``where`` (layer, weight, spec), the rule and the fix when ``spec``
        cannot fit the weight: ``constraints`` in the user's terms. Unstructured specs fit every weight."""
        return None

    @abstractmethod
    def index_bytes(self, spec, nnz: sympy.Expr) -> sympy.Expr:
        """Bytes of the index buffers the kernels read, for ``nnz`` stored values."""

    # kernels
    @abstractmethod
    def strategy(self, spec) -> Strategy:
        """The kernel strategy for ``spec``, with the reason."""
