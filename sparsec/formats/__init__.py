"""Storage formats: one ``Format`` per structure (layout, buffers, kernels), found by spec type.

``format_of(spec)`` is the format of a spec; ``make_layout`` checks a spec against a weight shape
and builds its ``Layout``; ``layout_of(*layout.key)`` rebuilds a layout from its canonical key, and
``layout_of_storage(*layout.op_key, n_values)`` from the custom ops' typed arguments and the values'
size, each parsed once per distinct key. A new structure is one module here (its ``Format`` and, if its kernels
are new, its ``Strategy``), one entry in ``FORMATS``, its templates in ``kernels/`` and its tests.
"""

from __future__ import annotations

import functools

from sparsec.errors import SparsecError
from sparsec.formats.base import Format, Layout, LayoutKey, Strategy, item_scores
from sparsec.formats.bsr import BSRFormat
from sparsec.formats.csr import CSRFormat
from sparsec.formats.ell import ELLFormat
from sparsec.formats.nm import NMFormat
from sparsec.spec.specs import Dense, Spec, parse_spec

FORMATS: dict[type, Format] = {f.spec_type: f for f in (CSRFormat(), NMFormat(), BSRFormat(), ELLFormat())}

# The kernel test cases: every format's examples, in FORMATS order (tests/interpret, tests/aot, bench).
KERNEL_CASES: tuple[tuple[str, int, int], ...] = tuple(case for f in FORMATS.values() for case in f.cases)


def format_of(spec: Spec) -> Format:
    """The storage format of a (parsed) sparse spec."""
    found = FORMATS.get(type(spec))
    if found is None:
        raise SparsecError(f"spec {spec} has no sparse storage format; a dense spec keeps the layer dense")
    return found


def check_layer(spec: Spec, out_features: int, in_features: int, layer: str = "layer") -> None:
    """Raise ``ShapeError`` naming the layer, the rule and the fix when ``spec`` cannot fit its weight."""
    if not isinstance(spec, Dense):
        format_of(spec).check(
            spec, out_features, in_features, f"{layer} (weight {out_features}x{in_features}, spec {spec})"
        )


def make_layout(spec: Spec, out_features: int, in_features: int, layer: str = "layer") -> Layout:
    """The layout of ``spec`` on an ``out_features x in_features`` weight (checked, clear errors)."""
    check_layer(spec, out_features, in_features, layer)
    return format_of(spec).layout(spec, out_features, in_features)


@functools.cache
def layout_of(spec: str, out_features: int, in_features: int) -> Layout:
    """The layout of a ``Layout.key``, parsed once per distinct key."""
    return make_layout(parse_spec(spec), out_features, in_features)


_FAMILIES = {f.family_word: f for f in FORMATS.values() if f.family_word is not None}


@functools.cache
def layout_of_storage(family: str, out_features: int, in_features: int, n_values: int) -> Layout:
    """The layout of the custom ops' arguments (``Layout.op_key``) holding ``n_values`` values: the kept
    count comes from the tensors, so a compiled graph serves every density of a structure."""
    fmt = _FAMILIES.get(family.split("(")[0]) or format_of(parse_spec(family))  # N:M: its spec text
    spec = fmt.storage_spec(family, out_features, in_features, n_values)
    if fmt.family(spec) != family:  # e.g. a whole spec text, where the ops take the structure alone
        raise SparsecError(f"{family!r} is not a layout family (a layout's op_key); did you mean {fmt.family(spec)!r}?")
    return layout_of(str(spec), out_features, in_features)


__all__ = [
    "FORMATS",
    "KERNEL_CASES",
    "Format",
    "Layout",
    "LayoutKey",
    "Strategy",
    "check_layer",
    "format_of",
    "item_scores",
    "layout_of",
    "layout_of_storage",
    "make_layout",
]
