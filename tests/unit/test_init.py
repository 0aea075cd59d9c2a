"""init=: a sparse layer's initial values are the dense init at the kept positions ("dense") or each output's
values rescaled for its own kept fan-in ("sparse"); each policy defaults to its reference implementation's."""

import math

import pytest
import torch
from torch import nn

import sparsec


def _linear():
    dense = nn.Linear(4, 2)
    with torch.no_grad():
        dense.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    return dense


def _write(layer, flat, dense):
    layer.take_dense(dense.weight, torch.tensor(flat))
    return layer


def test_sparse_init_rescales_each_output_for_its_kept_fan_in():
    dense = _linear()
    # unstructured: row 0 keeps 1 of 4 inputs (x sqrt(4/1) = 2), row 1 keeps 3 (x sqrt(4/3))
    layer = _write(sparsec.SparseLinear.from_dense(dense, "50%", "rigl", init="sparse"), [2, 4, 5, 7], dense)
    s = math.sqrt(4 / 3)
    assert layer.values.detach().tolist() == pytest.approx([3.0 * 2, 5.0 * s, 6.0 * s, 8.0 * s])
    plain = _write(sparsec.SparseLinear.from_dense(dense, "50%", "rigl", init="dense"), [2, 4, 5, 7], dense)
    assert plain.values.detach().tolist() == [3.0, 5.0, 6.0, 8.0]
    # constant fan-in k=2 of 4: every value x sqrt(2)
    fan = sparsec.SparseLinear.from_dense(dense, "fanin(k=2)", "srigl", init="sparse")
    expected = fan.layout.values_from_dense(dense.weight.detach() * math.sqrt(2), fan.positions())
    assert torch.allclose(fan.values.detach(), expected)


def test_each_policy_defaults_to_its_references_init():
    dense = _linear()
    srigl = sparsec.SparseLinear.from_dense(dense, "fanin(k=2)", "srigl")  # condensed-sparsity: sparse init
    assert srigl.init == "sparse"
    expected = srigl.layout.values_from_dense(dense.weight.detach() * math.sqrt(2), srigl.positions())
    assert torch.allclose(srigl.values.detach(), expected)
    for policy in ("rigl", "set", "static", "snfs"):  # google-research/rigl: the dense init, masked
        assert sparsec.SparseLinear.from_dense(dense, "50%", policy).init == "dense"
    assert sparsec.SparseLinear.from_dense(dense, "fanin(k=2)", "srigl", init="dense").init == "dense"


def test_sparsify_takes_init_for_every_layer():
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)), spec="fanin(k=2)", init="sparse"
    )
    assert all(m.init == "sparse" for m in model if isinstance(m, sparsec.SparseLinear))
    bound = 1 / math.sqrt(8) * math.sqrt(8 / 2)  # nn.Linear's U(-1/sqrt(8), 1/sqrt(8)), rescaled for 2 inputs
    assert model[0].values.abs().max() <= bound and model[0].values.abs().max() > 1 / math.sqrt(8)


def test_an_unknown_init_is_refused_with_the_choices():
    with pytest.raises(sparsec.SparsecError, match="init='xavier'; choose one of"):
        sparsec.SparseLinear(4, 2, spec="50%", init="xavier")
