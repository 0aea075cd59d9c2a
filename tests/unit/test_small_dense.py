"""small_dense: the same chain, narrower, dense, with as many weights as the sparse model would keep."""

import pytest
import torch
from torch import nn

import sparsec


def _mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _weights(model):
    return sum(m.weight.numel() for m in model if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_widths_fit_the_sparse_budget_as_closely_as_possible():
    sparse = sparsec.sparsify(_mlp(), spec="90%", distribution="erk")
    budget = sum(
        m.layout.nnz if isinstance(m, sparsec.SparseLinear) else m.weight.numel()
        for m in sparse
        if isinstance(m, (nn.Linear, sparsec.SparseLinear))
    )
    small = sparsec.sparsify(_mlp(), spec="90%", policy="small_dense", distribution="erk")
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in small)
    width = small[0].out_features
    assert small[2].in_features == small[2].out_features == small[4].in_features == width
    assert small[0].in_features == 64 and small[4].out_features == 10
    assert _weights(small) <= budget < 64 * (width + 1) + (width + 1) ** 2 + (width + 1) * 10
    assert small(torch.randn(3, 64)).shape == (3, 10)


def test_conv_chains_through_flatten():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))
    small = sparsec.sparsify(model, spec="80%", policy=sparsec.small_dense)
    assert small[3].in_features == small[0].out_channels * 16
    assert small(torch.randn(2, 3, 4, 4)).shape == (2, 10)


def test_small_dense_needs_a_sequential_chain():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(sparsec.SparsecError, match="defined here for an nn.Sequential chain"):
        sparsec.sparsify(Net(), spec="50%", policy="small_dense")
