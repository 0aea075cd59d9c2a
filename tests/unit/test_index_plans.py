"""Index plans belong to their layer (issue 10): one live plan per layer however many updates ran, rebuilt in
place when the mask changes (a captured CUDA graph would read the new mask), freed with the layer."""

import gc
import weakref

import pytest
import torch
from torch import nn

import sparsec
from sparsec.codegen.cpp import compiler
from sparsec.runtime import ops, plans
from sparsec.runtime.cpu import CSRPlan

needs_compiler = pytest.mark.skipif(compiler() is None, reason="no C++ compiler on this machine")


def _live_plans() -> int:
    gc.collect()
    return sum(type(o) is CSRPlan for o in gc.get_objects())


def _train(model, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=10 * steps)
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    grown = 0
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        grown += sum(updater.step().values())
        opt.zero_grad()
    return grown


def test_one_plan_per_layer_rebuilt_in_place_across_updates(monkeypatch):
    monkeypatch.setenv("SPARSEC_BACKEND", "cpu")  # the plan this test reads (the suite may run under another)
    torch.manual_seed(0)
    model = nn.Sequential(
        sparsec.SparseLinear(12, 16, spec="75%", policy=sparsec.rigl(delta_t=1)),
        nn.ReLU(),
        sparsec.SparseLinear(16, 4, spec="50%", policy=sparsec.set_(delta_t=1)),
    )
    before = _live_plans()
    _train(model, 1)
    layer = model[0]
    index = list(layer.index_buffers().values())
    plan = ops.index_plan(layer.layout.key, "cpu", index)
    col, col_ptr, cols_before = plan.col, plan.col.data_ptr(), plan.col.clone()
    assert _train(model, 12) > 0  # 12 updates that moved weights
    after = ops.index_plan(layer.layout.key, "cpu", index)
    assert after is plan and after.col is col and after.col.data_ptr() == col_ptr  # same storage...
    assert not torch.equal(after.col, cols_before)  # ...holding the new mask
    assert _live_plans() - before <= 2  # one per layer, not one per mask the layers ever had


def test_a_plan_is_freed_with_its_layer():
    layer = sparsec.SparseLinear(12, 16, spec="75%")
    layer(torch.randn(2, 12))
    plan = weakref.ref(ops.index_plan(layer.layout.key, "cpu", list(layer.index_buffers().values())))
    assert plan() is not None
    del layer
    gc.collect()
    assert plan() is None


@pytest.mark.parametrize("backend,field", [("cpu", "col"), pytest.param("cpp", "cols", marks=needs_compiler)])
def test_a_mask_write_refreshes_the_held_plan_before_any_call(backend, field, monkeypatch):
    """A CUDA graph replays kernels without running Python: the plan must hold the new mask as soon as the
    mask is written, not at the next eager call of the op (which is what refills it otherwise)."""
    monkeypatch.setenv("SPARSEC_BACKEND", backend)
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(12, 16, spec="75%")
    layer(torch.randn(2, 12))  # the op builds and holds the plan
    index = list(layer.index_buffers().values())
    held = getattr(index[0], plans._PLAN_ATTR)[backend]
    col = getattr(held.plan, field)
    cols_before = col.clone()
    new = torch.randperm(12 * 16)[: layer.layout.n_items].sort().values
    assert not torch.equal(new, layer.positions())
    layer.set_positions(new, torch.arange(layer.layout.n_items))
    assert getattr(held.plan, field) is col and not torch.equal(col, cols_before)  # same storage, the new mask
    expected = CSRPlan.build(layer.layout, new)
    assert torch.equal(col.long(), expected.col)
