"""The generated grow_scores kernels choose exactly what the CPU path chooses (ties included), in the
interpreter, on shapes that are not multiples of any tile."""

import pytest
import torch

import sparsec
from sparsec import config
from sparsec.nn.formats import make_layout
from sparsec.policies.candidates import GrowCapture
from sparsec.policies.decision import choose_drops
from sparsec.runtime.ops import grow_selector

CASES = [
    ("90%", 37, 53),
    ("70%", 21, 130),  # rows span several 64-wide column tiles
    ("2:4", 37, 52),
    ("1:8", 21, 56),
    ("fanin(k=7)", 37, 53),
    ("fanin(k=40)", 9, 150),
    ("block(16x16, 50%)", 48, 80),
    ("block(4x8, 50%)", 20, 40),
]


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("spec,out,inn", CASES)
def test_kernel_growth_equals_cpu_growth(spec, out, inn, ties):
    gen = torch.Generator().manual_seed(7)
    layout = make_layout(sparsec.parse_spec(spec), out, inn)
    for drop_fraction in (0.05, 0.3, 1.0):
        kept = layout.random_positions(gen)
        dropped = choose_drops(torch.rand(layout.n_items, generator=gen), int(layout.n_items * drop_fraction))
        if ties:  # small integers: |dY^T X| has many exact ties (and zero columns)
            dy = torch.randint(-1, 2, (13, out), generator=gen).float()
            x = torch.randint(-1, 2, (13, inn), generator=gen).float()
            x[:, ::3] = 0
        else:
            dy, x = torch.randn(13, out, generator=gen), torch.randn(13, inn, generator=gen)
        expected = GrowCapture(layout, kept, dropped)._observe_chunked(dy, x).grown()
        with config.patch(backend="interpret"):
            got = grow_selector(layout, kept, dropped, dy, x)
        assert got is not None and got.finite and got.complete
        assert torch.equal(got.grown(), expected), (spec, drop_fraction)


def test_cpu_backend_and_non_power_of_two_nm_use_the_chunked_path():
    layout = make_layout(sparsec.parse_spec("2:4"), 8, 16)
    kept = layout.random_positions()
    with config.patch(backend="cpu"):
        assert grow_selector(layout, kept, kept[:0], torch.randn(3, 8), torch.randn(3, 16)) is None
    layout = make_layout(sparsec.parse_spec("1:3"), 8, 15)
    with config.patch(backend="interpret"):
        assert grow_selector(layout, layout.random_positions(), kept[:0], torch.randn(3, 8), torch.randn(3, 15)) is None
