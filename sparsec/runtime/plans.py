"""Index plans: the structures each strategy's kernels read, built from a layer's index buffers and held on them.

A layer's plans hang on its first index buffer, one per kind (``cpu``: the CSR structures PyTorch's kernels
and the dense strategy read; ``cpp``; the Triton strategy's), so they belong to the layer: freed with its
buffers, never confused with another tensor that reuses an address, never pickled or deep-copied with it
(``tensor_state``: a copy builds its own). An in-place mask change (a new
``_version``) rebuilds a plan into the same tensors where the shapes allow (they do for one layout), so a
CUDA graph captured before an update reads the new mask when it replays.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from sparsec.formats import LayoutKey, layout_of
from sparsec.runtime.cpp import CppPlan
from sparsec.runtime.cpu import CSRPlan
from sparsec.runtime.tensor_state import tensor_state

_PLAN_ATTR = "_sparsec_plans"


def index_plan(key: LayoutKey, kind: str, index: list[torch.Tensor], items: torch.Tensor | None = None):
    """The plan of ``kind`` (a backend name: ``cpu``, ``cpp``, ``triton``, ``interpret``) for these buffers;
    ``items``: their sorted flat item positions where the caller has them (else decoded from the buffers)."""
    versions = tuple(t._version for t in index)
    plans: dict[str, _HeldPlan] = tensor_state(index[0], _PLAN_ATTR)
    held = plans.get(kind)
    if held is not None and held.serves(key, index):
        if held.versions != versions:
            new = _build_plan(key, kind, index, items, into=held.plan)
            held.plan, held.versions = _refill(held.plan, new), versions
        return held.plan
    plans[kind] = _HeldPlan(key, [weakref.ref(t) for t in index], versions, _build_plan(key, kind, index, items))
    return plans[kind].plan


def held_plan(index: list[torch.Tensor], kind: str):
    """The plan of ``kind`` these buffers hold now, or None (nothing ran on them yet)."""
    held = getattr(index[0], _PLAN_ATTR, {}).get(kind)
    return None if held is None else held.plan


def refresh_plan(index: list[torch.Tensor], items: torch.Tensor | None = None) -> None:
    """Rebuild the plans held on these index buffers now, in place, after their contents changed (to the
    sorted flat item positions ``items`` where the caller has them: no decode of the buffers).

    Called where a mask is written: a CUDA graph replays its kernels without running Python, so the
    plan its kernels read must hold the new mask before the next replay, not at the next eager call.
    Nothing is held (no call has run yet): nothing to do.
    """
    for kind, held in list(getattr(index[0], _PLAN_ATTR, {}).items()):
        if held.serves(held.key, index):
            index_plan(held.key, kind, index, items)


@dataclasses.dataclass
class _HeldPlan:
    key: LayoutKey
    index: list[weakref.ref]  # weak: the plan hangs on index[0] and must not keep the others alive
    versions: tuple[int, ...]
    plan: object

    def serves(self, key: LayoutKey, index: list[torch.Tensor]) -> bool:
        same = len(self.index) == len(index) and all(r() is t for r, t in zip(self.index, index, strict=False))
        return same and self.key == key


def _build_plan(
    key: LayoutKey, kind: str, index: list[torch.Tensor], items: torch.Tensor | None = None, into: object = None
):
    """A new plan, or ``into`` (the plan held before) rebuilt in place where the kind can (cpp, single weights)."""
    layout = layout_of(*key)
    buffers = {name: t for (name, _, _), t in zip(layout.buffers, index, strict=True)}
    if kind == "cpp" and layout.item == (1, 1):  # single weights: the generated plan kernel, linear work
        shape, held = (layout.out_features, layout.in_features), into if isinstance(into, CppPlan) else None
        rows = layout.format.compressed_rows(layout, buffers)
        if rows is not None:  # from the buffers themselves: no int64 positions read or decoded
            return CppPlan.of_rows(*rows, shape, into=held)
        return CppPlan.of_weights(layout.decode(buffers) if items is None else items, shape, into=held)
    if items is None and kind in ("cpu", "cpp"):
        items = layout.decode(buffers)
    if kind == "cpu":
        return CSRPlan.build(layout, items)
    if kind == "cpp":
        return CppPlan.build(CSRPlan.build(layout, items), layout, items)
    return layout.format.strategy(layout.spec).plan(layout, buffers)


def _plan_tensors(plan) -> dict[str, torch.Tensor | None]:
    if isinstance(plan, dict):
        return plan
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}


def _refill(old, new):
    """``old`` with ``new``'s contents copied into its tensors when every tensor matches in shape and dtype
    (the plan's storage stays where a captured graph reads it); else ``new``."""
    if new is old:  # rebuilt in place
        return old
    a, b = _plan_tensors(old), _plan_tensors(new)
    matches = a.keys() == b.keys() and all(
        (x is None and y is None)
        or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype)
        or (not isinstance(x, torch.Tensor) and x == y)
        for x, y in ((a[k], b[k]) for k in a)
    )
    if not matches:
        return new
    for k, x in a.items():
        if isinstance(x, torch.Tensor):
            x.copy_(b[k])
    return old
