"""One Format per storage structure: the registry, the shared counts, the kernel cases, and that no
layer above formats knows a structure by name."""

import ast
from pathlib import Path

import pytest
import sympy
import torch
from helpers import SPECS_AND_SHAPES

import sparsec
from sparsec.formats import FORMATS, KERNEL_CASES, format_of, layout_of, layout_of_storage, make_layout
from sparsec.formats.base import SYM, kept_count
from sparsec.spec import SPEC_TYPES, Dense, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def test_every_sparse_spec_type_has_one_format():
    assert set(FORMATS) == set(SPEC_TYPES) - {Dense}
    assert len({f.name for f in FORMATS.values()}) == len(FORMATS)
    with pytest.raises(sparsec.SparsecError, match="spec dense has no sparse storage format; a dense spec keeps"):
        format_of(Dense())


def test_layout_of_parses_once_per_distinct_layout():
    a = layout_of("2:4", 8, 16)
    assert layout_of("2:4", 8, 16) is a and a == make_layout(sparsec.parse_spec("2:4"), 8, 16)
    assert a.format is format_of(a.spec)


def test_kernel_cases_are_every_format_s_examples():
    assert KERNEL_CASES == tuple(case for f in FORMATS.values() for case in f.cases)
    for fmt in FORMATS.values():
        assert fmt.cases, fmt
        for spec, out, inn in fmt.cases:
            value = sparsec.parse_spec(spec)
            assert format_of(value) is fmt
            make_layout(value, out, inn)  # the case fits its layer


@pytest.mark.parametrize("n", [1, 7, 53, 1961, 4096 * 4096])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.9, 0.999, 1 / 3])
def test_the_symbolic_kept_count_is_the_runtime_one(n, s):
    assert int(SYM.kept(sympy.Integer(n), sympy.Float(s))) == kept_count(n, s)


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
def test_symbolic_units_and_rules_match_the_layout(spec, out, inn):
    value = sparsec.parse_spec(spec)
    fmt, layout = format_of(value), make_layout(value, out, inn)
    at = {SYM.OUT: out, SYM.IN: inn}
    assert int(fmt.units(value).subs(at)) == layout.n_units
    assert tuple(int(e.subs(at)) for e in fmt.values_shape(value)) == layout.values_shape
    for _, expr in fmt.constraints(value):
        assert expr.subs(at) in (0, sympy.true)
    flat = layout.random_positions(torch.Generator().manual_seed(0))
    assert torch.equal(layout.decode(layout.encode(flat)), flat)


def _structure_words() -> set[str]:
    """Names only a format may know: format and strategy names, buffer names, template files."""
    words = set()
    for fmt in FORMATS.values():
        words.add(fmt.name)
        for spec, out, inn in fmt.cases:
            value = sparsec.parse_spec(spec)
            strategy = fmt.strategy(value)
            words.add(strategy.name)
            words.update(template for template, _ in strategy.templates.values())
            words.update(name for name, _, _ in make_layout(value, out, inn).buffers)
    return words


@pytest.mark.parametrize("package", ["ir", "passes", "codegen", "runtime"])
def test_the_compiler_asks_the_format_instead_of_naming_a_structure(package):
    """Adding a structure touches its format module, its templates and its tests: nothing in the IR, the
    passes, codegen or the runtime imports a spec type or spells a format's names."""
    spec_types = {t.__name__ for t in SPEC_TYPES} - {"Dense"}
    words = _structure_words()
    found = []
    for path in sorted((ROOT / "sparsec" / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparsec.spec"):
                found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name in spec_types]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                found.append(f"{path.name}:{node.lineno} spells {node.value!r}")
    assert not found, found


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
def test_the_ops_key_and_the_values_size_give_the_layout_back(spec, out, inn):
    """The custom ops take the structure without its count (op_key) and read the count from the values:
    that layout stores exactly what the layer's does, under the same canonical key."""
    layout = make_layout(parse_spec(spec), out, inn)
    back = layout_of_storage(*layout.op_key, layout.nnz)
    assert (back.values_shape, back.buffers, back.key) == (layout.values_shape, layout.buffers, layout.key)
    assert layout_of(*layout.key).key == layout.key  # the canonical key is its own


def test_densities_of_one_structure_share_the_ops_key_and_keep_their_own_storage():
    a, b = (make_layout(parse_spec(s), 24, 40) for s in ("block(4x8, 50%)", "block(4x8, 75%)"))
    assert a.op_key == b.op_key == ("block(4x8)", 24, 40)
    assert (a.n_items, b.n_items) == (15, 8)  # 30 blocks: 30 - floor(0.5 * 30), 30 - floor(0.75 * 30)
    assert layout_of_storage(*a.op_key, 8 * 4 * 8).n_items == 8
    # a fan-in given by sparsity and by k store the same, so they share kernels and plans
    assert make_layout(parse_spec("fanin(80%)"), 23, 41).key == make_layout(parse_spec("fanin(k=9)"), 23, 41).key


@pytest.mark.parametrize("text", ["unstructured(0.9)", "block(4x8, 50%)", "fanin(k=3)"])
def test_the_ops_refuse_a_spec_where_they_take_a_family(text):
    with pytest.raises(sparsec.SparsecError, match="is not a (layout|block) family"):
        layout_of_storage(text, 24, 40, 30 * 32 if text.startswith("block") else 24 * 3)
