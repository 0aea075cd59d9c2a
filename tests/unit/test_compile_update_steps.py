"""torch.compile(fullgraph=True) through update steps: an armed step runs the graph an unarmed step runs
(the values gradient hands dY and X to the capture), so there is no graph break and no recompile at an
update, compiled training chooses the masks eager training chooses, and only a real shape change (gmp,
imp) recompiles, once."""

import copy
import re

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sparsec
from sparsec.nn.compile import _entries

POLICIES = {
    "static": sparsec.static,
    "set": sparsec.set_(delta_t=2),
    "rigl": sparsec.rigl(delta_t=2),
    "srigl": sparsec.srigl(delta_t=2),
    "snfs": sparsec.snfs(delta_t=2),
    "gmp": sparsec.gmp(delta_t=3, t_end=0.75),
}
STEPS = 20
RESHAPING = {"gmp", "snfs"}  # gmp prunes; snfs moves kept weights between layers: storage shapes change


def _batch(t: int):
    g = torch.Generator().manual_seed(t)
    return torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def _model(policy):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    spec = "fanin(75%)" if policy is POLICIES["srigl"] else "80%"
    return sparsec.sparsify(dense, spec=spec, policy=policy)


def _train(policy, forward_of):
    """20 steps; returns (positions changed, steps whose storage shapes changed, final masks)."""
    model = _model(policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    updater = sparsec.MaskUpdater(model, opt, total_steps=STEPS)
    forward = forward_of(model)
    layers = list(updater.layers.values())
    shapes, shape_changes, changed = [tuple(m.values.shape) for m in layers], 0, 0
    for t in range(STEPS):
        x, y = _batch(t)
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        changed += sum(updater.step().values())
        opt.zero_grad()
        now = [tuple(m.values.shape) for m in layers]
        shape_changes += now != shapes
        shapes = now
    return changed, shape_changes, [m.mask() for m in layers]


QUICK = {"rigl", "snfs", "gmp"}  # the quick tier: a grow capture, a moving budget, a prune; the rest are slow


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in POLICIES])
def test_fullgraph_compile_has_no_break_and_recompiles_only_at_shape_changes(name):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager")  # traces the backward too (AOTAutograd)
    changed, shape_changes, masks = _train(POLICIES[name], lambda m: torch.compile(m, backend=counter, fullgraph=True))
    eager_changed, _, eager_masks = _train(POLICIES[name], lambda m: m)

    assert not torch._dynamo.utils.counters["graph_break"]  # fullgraph would have raised on one, too
    assert counter.frame_count == 1  # no recompile: kept counts are dynamic sizes (sparsec.nn.compile)
    assert shape_changes >= 2 if name in RESHAPING else shape_changes == 0  # the case changes storage sizes
    if name != "static":
        assert changed > 0  # updates that moved weights (a capture that saw nothing would skip them)
    assert changed == eager_changed
    for a, b in zip(masks, eager_masks, strict=True):
        assert torch.equal(a, b)


def test_imp_rounds_under_fullgraph_compile_recompile_once_per_round():
    torch._dynamo.reset()
    model = _model(sparsec.imp(fraction=0.3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, backend=counter, fullgraph=True)
    rounds = 0
    for _ in sparsec.imp_rounds(model, opt):
        rounds += 1
        for t in range(3):
            x, y = _batch(t)
            nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert rounds >= 3  # at least two prunes happened between rounds
    assert counter.frame_count == 1  # one compile serves every round's storage sizes


def test_the_capture_follows_the_layer_to_new_buffers():
    """load_state_dict(assign=True) and .to() put new index buffers in: an armed capture still sees the
    next backward."""
    model = _model(sparsec.rigl(delta_t=1))
    updater = sparsec.MaskUpdater(model, None, total_steps=10)  # arms step 1 at once
    layer = updater.layers["0"]
    before = layer.row_offsets
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    assert layer.row_offsets is not before  # the case replaced the buffers
    x, y = _batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    assert [len(m.grow_capture.calls) for m in updater.layers.values()] == [1, 1, 1]


@pytest.mark.slow  # over 2 s: inductor compiles
def test_inductor_training_through_update_steps_chooses_the_eager_masks():
    torch._dynamo.reset()
    changed, _, masks = _train(POLICIES["rigl"], lambda m: torch.compile(m, fullgraph=True))
    eager_changed, _, eager_masks = _train(POLICIES["rigl"], lambda m: m)
    assert changed > 0 and changed == eager_changed
    for a, b in zip(masks, eager_masks, strict=True):
        assert torch.equal(a, b)


def test_a_layer_pruned_to_one_kept_weight_does_not_recompile():
    """Dynamo specialises dynamic sizes at 0 and 1; the declaration makes them unbacked too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = sparsec.sparsify(nn.Sequential(nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 2)), spec="99.9%",
                             policy=sparsec.gmp(delta_t=1, t_end=0.9))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, backend=counter, fullgraph=True)
    seen = set()
    for _ in range(20):
        forward(torch.randn(4, 12)).sum().backward()
        opt.step()
        updater.step()
        opt.zero_grad()
        seen.add(tuple(m.values.numel() for m in updater.layers.values()))
    assert (1, 1) in seen and len(seen) >= 5  # counts down to a single kept weight per layer
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ["dec y", "a,b", "x'y", "naïve", "0"])
def test_the_declared_entries_name_exactly_the_layer_s_storage(name):
    """Torch strips spaces from these options and splits them on commas: the entries survive both and match
    the layer's own storage tensors only."""
    layer = sparsec.SparseLinear(8, 4, spec="50%")
    entries = ",".join(_entries(name, layer)).replace(" ", "").split(",")  # what torch does to the option
    patterns = [re.compile(e.rsplit(":", 1)[0]) for e in entries]
    assert [e.rsplit(":", 1)[1] for e in entries] == ["0", "0"]  # the count dim of values and col_indices
    prefix = f"L['self']._modules['{name}']"
    own = [f"{prefix}._parameters['values']", f"{prefix}._buffers['col_indices']"]
    others = [f"{prefix}._parameters['bias']", f"{prefix}._buffers['row_offsets']", own[0].replace(name, name + "x")]
    assert [s for s in own + others if any(p.match(s) for p in patterns)] == own
