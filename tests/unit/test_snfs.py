"""snfs: magnitude drop, momentum-proportional redistribution across layers, growth by |momentum|."""

import pytest
import torch
from torch import nn

import sparsec
from sparsec import config
from sparsec.policies.snfs import _grow_by_momentum, redistribute


def test_redistribution_by_largest_remainder_within_capacity():
    assert redistribute(10, [1.0, 3.0], [100, 100]) == [3, 7]  # 2.5 / 7.5: the tie goes to the first
    assert redistribute(10, [1.0, 3.0], [100, 4]) == [6, 4]  # a full layer passes the rest on
    assert redistribute(5, [0.0, 0.0], [10, 10]) == [3, 2]  # no momentum anywhere: equal shares
    assert sum(redistribute(17, [0.2, 0.5, 0.3], [5, 100, 100])) == 17


def test_growth_takes_fresh_positions_first_and_fills_from_the_dropped():
    kept, dropped = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2])  # of 6 positions: 4 and 5 are fresh
    scores = torch.tensor([9.0, 0, 8, 0, 1, 2])  # the dropped ones have the largest momentum
    assert _grow_by_momentum(kept, dropped, scores, 1, regrow_dropped=False).tolist() == [5]
    assert _grow_by_momentum(kept, dropped, scores, 3, regrow_dropped=False).tolist() == [5, 4, 0]
    assert _grow_by_momentum(kept, dropped, scores, 1, regrow_dropped=True).tolist() == [0]


def _model(optimizer="sgd"):
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)),
        spec="70%",
        policy="snfs(delta_t=5, prune_rate=0.5)",
    )
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=0.01)
    )
    return model, opt, sparsec.MaskUpdater(model, opt, total_steps=100)


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # 1: the shadow folds dY^T X one output row at a time
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_keeps_the_total_and_grows_by_momentum(optimizer, chunk_bytes):
    model, opt, updater = _model(optimizer)
    layers = [model[0], model[2]]
    x = torch.randn(32, 12)
    for t in range(1, 6):
        with config.patch(**({} if chunk_bytes is None else {"grow_chunk_bytes": chunk_bytes})):
            model(x).square().mean().backward()
        opt.step()
        if t == 5:  # the first update step: the shadow equals the optimizer state so far
            shadows = [updater._states["0"], updater._states["2"]]
            for layer, shadow in zip(layers, shadows, strict=True):
                state = opt.state[layer.values]
                real = state["momentum_buffer"] if optimizer == "sgd" else state["exp_avg"]
                torch.testing.assert_close(shadow.m.reshape(-1)[layer.positions()], real.float())
            before = {id(layer): (layer.positions().clone(), layer.values.detach().clone()) for layer in layers}
            scores = [s.scores().clone() for s in shadows]
            total = sum(layer.layout.nnz for layer in layers)
        updater.step()
        opt.zero_grad()
    assert sum(layer.layout.nnz for layer in layers) == total  # redistribution moves, never loses
    for layer, score in zip(layers, scores, strict=True):
        kept_before, values_before = before[id(layer)]
        now = layer.positions()
        new = now[~torch.isin(now, kept_before)]
        fresh = ~torch.isin(torch.arange(score.numel()), kept_before)
        if new.numel():  # grown positions have the largest momentum among the fresh ones
            worst_grown = score.reshape(-1)[new].min()
            not_taken = fresh & ~torch.isin(torch.arange(score.numel()), now)
            assert worst_grown >= score.reshape(-1)[not_taken].max()
        assert bool((layer.dense_weight().reshape(-1)[new] == 0).all())  # grown start at zero
    assert updater.last_dropped["0"] > 0 and updater.last_changes["0"] + updater.last_changes["2"] > 0


def test_snfs_needs_unstructured_specs():
    with pytest.raises(
        sparsec.SpecError, match="snfs moves weights between layers, so layer densities change: it needs unstructured"
    ):
        sparsec.SparseLinear(8, 4, spec="fanin(k=2)", policy="snfs")


def test_a_full_layer_gives_its_drop_to_layers_with_fresh_room():
    """A layer that is dense has no fresh positions: what it drops goes to other layers, so its mask
    changes too (regrowing its own drop would leave it unchanged)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        sparsec.SparseLinear(12, 10, spec="0%", policy="snfs(delta_t=2, regrow_dropped=False)"),
        nn.ReLU(),
        sparsec.SparseLinear(10, 40, spec="90%", policy="snfs(delta_t=2, regrow_dropped=False)"),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updater = sparsec.MaskUpdater(model, opt, total_steps=100)
    x = torch.randn(32, 12)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        updater.step()
        opt.zero_grad()
    dropped = updater.last_dropped["0"]
    assert dropped > 0 and model[0].layout.nnz == 120 - dropped
    assert model[2].layout.nnz == 40 + dropped  # all of it: 360 fresh positions there
    assert updater.last_changes["2"] == dropped + updater.last_dropped["2"]
