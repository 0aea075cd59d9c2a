"""Storage formats: how a spec's kept weights are laid out, indexed and checked.

Every format is described by one ``Layout`` in the same terms:

- *items* are what is kept or dropped: single weights, or whole ``bh x bw`` blocks for block
  sparsity. They live on an item grid of ``rows x cols`` (the weight, or its block grid), and an
  item's *flat index* is ``row * cols + col`` on that grid.
- *units* are the ranges of flat indices whose kept count is fixed: the whole layer
  (unstructured, block), one group of M (N:M), one row (constant fan-in). Units are contiguous
  in flat index, so ``unit = flat // unit_size``.
- values are stored in ascending flat order, one item after another: ``[out, in*N/M]`` for N:M,
  ``[out, k]`` for fan-in, ``[nblocks, bh, bw]`` for block, ``[nnz]`` for unstructured; the
  integer buffers are those DESIGN.md names for each format.

``encode`` and ``decode`` convert between sorted flat item positions and the buffers; nothing
here ever builds a dense ``[out, in]`` tensor except ``to_dense`` (tests, plots, export).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsec.errors import ShapeError, SparsecError
from sparsec.spec.specs import NM, Block, FanIn, Spec, Unstructured, check_layer


@dataclass(frozen=True)
class Layout:
    spec: Spec
    out_features: int
    in_features: int
    grid: tuple[int, int]  # item grid (rows, cols)
    item: tuple[int, int]  # item shape: (1, 1) for weights, (bh, bw) for blocks
    unit_size: int  # flat items per unit
    kept_per_unit: int
    values_shape: tuple[int, ...]
    buffers: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]  # (name, dtype, shape)

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

    def encode(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Index buffers for sorted flat item positions ``flat`` (int64 ``[n_items]``)."""
        rows, cols = flat // self.grid[1], flat % self.grid[1]
        spec = self.spec
        if isinstance(spec, NM):
            pos = (cols % spec.m).view(self.out_features, -1)
            return {"nm_positions": pos.to(self.buffers[0][1])}
        if isinstance(spec, FanIn):
            return {"fanin_indices": cols.view(self.out_features, -1).to(torch.int32)}
        offsets = torch.zeros(self.grid[0] + 1, dtype=torch.int64, device=flat.device)
        offsets[1:] = torch.bincount(rows, minlength=self.grid[0]).cumsum(0)
        if isinstance(spec, Block):
            return {"block_row_offsets": offsets.to(torch.int32), "block_cols": cols.to(torch.int32)}
        return {"row_offsets": offsets.to(torch.int32), "col_indices": cols.to(torch.int32)}

    def decode(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sorted flat item positions (int64) from the index buffers."""
        spec = self.spec
        if isinstance(spec, NM):
            pos = buffers["nm_positions"].to(torch.int64)
            group = torch.arange(pos.shape[1], device=pos.device) // spec.n
            row = torch.arange(pos.shape[0], device=pos.device)[:, None]
            return (row * self.in_features + group * spec.m + pos).reshape(-1)
        if isinstance(spec, FanIn):
            idx = buffers["fanin_indices"].to(torch.int64)
            row = torch.arange(idx.shape[0], device=idx.device)[:, None]
            return (row * self.in_features + idx).reshape(-1)
        names = ("block_row_offsets", "block_cols") if isinstance(spec, Block) else ("row_offsets", "col_indices")
        offsets, cols = (buffers[n].to(torch.int64) for n in names)
        rows = torch.repeat_interleave(torch.arange(self.grid[0], device=cols.device), offsets.diff())
        return rows * self.grid[1] + cols

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
        if flat.numel() > 1 and not bool((flat.diff() > 0).all()):
            raise ShapeError(f"{what} positions are not strictly increasing (duplicates or unsorted)")
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
        return {NM: "a group of M inputs", FanIn: "an output row"}.get(type(self.spec), "the layer")

    @property
    def shape_text(self) -> str:
        return f"weight {self.out_features}x{self.in_features}"

    # --- construction helpers --------------------------------------------------------------------

    def random_positions(self, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniformly random sorted flat positions satisfying the spec (the RigL initial topology)."""
        if self.n_units == 1:
            flat = torch.randperm(self.unit_size, generator=generator)[: self.kept_per_unit]
        else:
            scores = torch.rand(self.n_units, self.unit_size, generator=generator)
            local = scores.argsort(dim=1)[:, : self.kept_per_unit]
            flat = (torch.arange(self.n_units)[:, None] * self.unit_size + local).reshape(-1)
        return flat.sort().values.to(device)

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


def make_layout(spec: Spec, out_features: int, in_features: int, layer: str = "layer") -> Layout:
    """The layout of ``spec`` on an ``out_features x in_features`` weight (checked, clear errors)."""
    check_layer(spec, out_features, in_features, layer)
    out, inn = out_features, in_features
    weights = dict(spec=spec, out_features=out, in_features=inn, grid=(out, inn), item=(1, 1))
    if isinstance(spec, NM):
        per_row = inn // spec.m * spec.n
        pos_dtype = torch.uint8 if spec.m <= 256 else torch.int32
        return Layout(
            **weights,
            unit_size=spec.m,
            kept_per_unit=spec.n,
            values_shape=(out, per_row),
            buffers=(("nm_positions", pos_dtype, (out, per_row)),),
        )
    if isinstance(spec, FanIn):
        k = spec.k if spec.k is not None else max(1, inn - math.floor(spec.sparsity * inn))
        return Layout(
            **weights,
            unit_size=inn,
            kept_per_unit=k,
            values_shape=(out, k),
            buffers=(("fanin_indices", torch.int32, (out, k)),),
        )
    if isinstance(spec, Block):
        grid = (out // spec.rows, inn // spec.cols)
        n = grid[0] * grid[1]
        kept = max(1, n - math.floor(spec.sparsity * n))
        return Layout(
            **{**weights, "grid": grid, "item": (spec.rows, spec.cols)},
            unit_size=n,
            kept_per_unit=kept,
            values_shape=(kept, spec.rows, spec.cols),
            buffers=(("block_row_offsets", torch.int32, (grid[0] + 1,)), ("block_cols", torch.int32, (kept,))),
        )
    if isinstance(spec, Unstructured):
        n = out * inn
        kept = max(1, n - math.floor(spec.sparsity * n))
        return Layout(
            **weights,
            unit_size=n,
            kept_per_unit=kept,
            values_shape=(kept,),
            buffers=(("row_offsets", torch.int32, (out + 1,)), ("col_indices", torch.int32, (kept,))),
        )
    raise SparsecError(f"spec {spec} has no sparse storage format; a dense spec keeps the layer dense")
