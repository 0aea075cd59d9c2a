"""The swapped-grid kernel variant (``SWAP=True``, launched when a grid's second axis passes CUDA's 65,535)
computes what the usual one does: here every two-axis launch is swapped."""

import pytest
import torch
from helpers import assert_interpret_matches_cpu

import sparsec
import sparsec.runtime.launch as launch
from sparsec import config
from sparsec.runtime.grow import kernel_selection
from sparsec.runtime.selection import score_chunked

CASES = [("90%", 37, 53), ("2:4", 37, 52), ("block(16x16, 50%)", 48, 80), ("fanin(k=7)", 37, 53)]


@pytest.mark.parametrize("spec,out,inn", CASES)
def test_swapped_grids_give_the_same_products_and_growth(spec, out, inn, monkeypatch):
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(inn, out, spec=spec)
    x = torch.randn(11, inn, requires_grad=True)
    swaps = []

    def always_swap(grid):
        if len(grid) == 1:
            return grid, {}
        swaps.append(grid)
        return grid[::-1], {"SWAP": True}

    monkeypatch.setattr(launch, "launch_grid", always_swap)
    assert_interpret_matches_cpu(layer, x)
    assert any(a != b for a, b in swaps)  # launches really ran swapped, on grids that are not square
    kept = layer.positions()
    dropped = torch.arange(0, layer.layout.n_items, 3)
    dy = torch.randn(11, out)
    with config.patch(backend="interpret"):
        got = kernel_selection(layer.layout, kept, dropped, dy, x.detach(), False)
    assert torch.equal(got.grown(), score_chunked(layer.layout, kept, dropped, dy, x.detach(), False).grown())
