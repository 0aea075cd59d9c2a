"""torch.save(model) / torch.load and copy.deepcopy of a model with sparse layers, armed for a RigL update:
the copy computes exactly what the original does, holds none of its per-process state (position cache, index
plans, grow capture and tap) and trains on its own; the original's armed update still happens."""

import copy
import io

import pytest
import torch
from torch import nn

import sparsec
from sparsec.runtime import ops, plans

SPECS = ["90%", "2:4", "block(4x4, 75%)", "fanin(75%)"]


def _model(spec: str) -> nn.Sequential:
    torch.manual_seed(0)
    policy = sparsec.rigl(delta_t=2, regrow_dropped=False)
    return nn.Sequential(
        sparsec.SparseLinear(32, 16, spec=spec, policy=policy), nn.ReLU(), sparsec.SparseLinear(16, 8, spec=spec)
    )


def _armed(spec: str):
    """A model one step before a RigL update (its first layer's grow capture set), with its updater."""
    model = _model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    x = torch.randn(6, 32)
    for _ in range(4):
        model(x).square().sum().backward()
        opt.step()
        updater.step()
        opt.zero_grad()
        if model[0].grow_capture is not None:
            return model, opt, updater, x
    raise AssertionError("the updater never armed the layer: the test would not cover a capture")


def _state_of(layer) -> dict:
    index = list(layer.index_buffers().values())
    return index[0].__dict__


def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
@pytest.mark.parametrize("spec", SPECS)
def test_a_copy_of_an_armed_model_computes_the_same_and_holds_no_per_process_state(spec, how):
    model, opt, updater, x = _armed(spec)
    layer = model[0]
    assert plans.held_plan(list(layer.index_buffers().values()), ops.backend_for(layer.values)) is not None
    assert _state_of(layer).get(ops._TAP_ATTR, {}).get("tap") is layer.grow_capture
    copied = _pickled(model) if how == "torch.save" else copy.deepcopy(model)
    ours, theirs = model.state_dict(), copied.state_dict()
    assert ours.keys() == theirs.keys()
    for key, a in ours.items():  # tensors bit for bit; the layers' extra state (spec, policy) equal
        assert torch.equal(a, theirs[key]) if isinstance(a, torch.Tensor) else a == theirs[key], key
    assert copied[0].grow_capture is None and copied[0]._cache is None
    assert not _state_of(copied[0]).get(plans._PLAN_ATTR) and not _state_of(copied[0]).get(ops._TAP_ATTR)
    y = copied(x)
    assert torch.equal(y, model(x))
    # the copy's backward feeds no capture of the original: the original's armed update still sees its own step
    y.square().sum().backward()
    assert copied[0].values.grad is not None and layer.grow_capture.calls == []  # the original saw nothing
    model(x).square().sum().backward()
    assert len(layer.grow_capture.calls) == 1
    opt.step()
    changed = updater.step()
    assert changed and sum(changed.values()) > 0


@pytest.mark.parametrize("spec", SPECS)
def test_a_loaded_model_trains_with_an_updater_of_its_own(spec):
    model, _, _, x = _armed(spec)
    loaded = _pickled(model)
    before = [loaded[i].mask().clone() for i in (0, 2)]
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(loaded, opt, total_steps=20)
    grown = 0
    for _ in range(4):
        loaded(x).square().sum().backward()
        opt.step()
        grown += sum(updater.step().values())
        opt.zero_grad()
    assert grown > 0
    assert any(not torch.equal(b, loaded[i].mask()) for b, i in zip(before, (0, 2), strict=True))
