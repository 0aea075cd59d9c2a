"""The memory-bounded paths of issue 15: conversions, rescaling and remaps a chunk at a time give what one
pass gives (chunks of a few items, so every case crosses chunk boundaries); encode writes into the layer's
buffers; sympy and networkx load only when lowering needs them."""

import math
import subprocess
import sys

import pytest
import torch

import sparsec
from sparsec.formats import base, make_layout
from sparsec.nn import layers

CASES = [("90%", 37, 53), ("block(4x4, 75%)", 16, 32), ("fanin(75%)", 9, 40), ("2:4", 12, 16)]


@pytest.mark.parametrize("spec,out,inn", CASES)
def test_encode_and_decode_a_few_items_at_a_time_match_the_definition(spec, out, inn, monkeypatch):
    monkeypatch.setattr(base, "_ROWS_CHUNK", 5)
    layout = make_layout(sparsec.parse_spec(spec), out, inn)
    flat = layout.random_positions(torch.Generator().manual_seed(2))
    bufs = layout.encode(flat)
    assert torch.equal(layout.decode(bufs), flat)
    if layout.format.compressed_rows(layout, bufs) is not None or spec.startswith("block"):
        offsets, cols = base.encode_rows(layout, flat)
        rows = flat // layout.grid[1]
        want = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(rows, minlength=layout.grid[0]).cumsum(0)])
        assert torch.equal(offsets.long(), want) and torch.equal(cols.long(), flat % layout.grid[1])


@pytest.mark.parametrize("spec,out,inn", CASES)
def test_encode_writes_into_the_buffers_it_is_given(spec, out, inn):
    layout = make_layout(sparsec.parse_spec(spec), out, inn)
    flat = layout.random_positions(torch.Generator().manual_seed(3))
    want = layout.encode(flat)
    into = {name: torch.full(shape, 7, dtype=dtype) for name, dtype, shape in layout.buffers}
    got = layout.encode(flat, out=into)
    for name in want:
        assert got[name] is into[name] and torch.equal(got[name], want[name]), name


def test_sparse_init_a_few_values_at_a_time_rescales_each_output_for_its_kept_fan_in(monkeypatch):
    monkeypatch.setattr(layers, "_FAN_IN_CHUNK", 3)
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(40, 9, spec="80%", init="sparse")
    torch.manual_seed(0)
    plain = sparsec.SparseLinear(40, 9, spec="80%", init="dense")  # the same draws, not rescaled
    flat = layer.positions()
    assert torch.equal(flat, plain.positions())
    kept = torch.bincount(flat // 40, minlength=9)  # by hand: sqrt(40 / kept inputs of the value's output)
    scale = torch.tensor([math.sqrt(40 / int(kept[r])) for r in (flat // 40).tolist()])
    assert torch.allclose(layer.values.detach(), plain.values.detach() * scale)


def test_remap_a_few_items_at_a_time_moves_values_and_zeroes_grown_ones(monkeypatch):
    monkeypatch.setattr(layers, "_REMAP_CHUNK", 3)
    old = torch.arange(1.0, 9.0).reshape(4, 2)  # four 1x2 items
    src = torch.tensor([2, -1, 0, 3, -1])
    got = layers.remap_items(old, src, (5, 2))
    assert got.tolist() == [[5.0, 6.0], [0.0, 0.0], [1.0, 2.0], [7.0, 8.0], [0.0, 0.0]]


def _modules_after(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_building_and_training_a_layer_loads_neither_sympy_nor_networkx():
    code = (
        "import sys, torch, sparsec\n"
        "layer = sparsec.SparseLinear(64, 32, spec='90%')\n"
        "layer(torch.randn(4, 64)).sum().backward()\n"
        "print('sympy' in sys.modules, 'networkx' in sys.modules)\n"
        "sparsec.explain(layer)\n"  # lowering loads them
        "print('sympy' in sys.modules, 'networkx' in sys.modules)\n"
    )
    assert _modules_after(code).splitlines() == ["False False", "True True"]
