"""torch.compile through RigL update steps: the armed step runs the same custom op (a hook on its output
hands dY and X to the capture), so compiled training chooses exactly the masks eager training chooses."""

import pytest
import torch
from torch import nn

import sparsec


def _train(compiled: bool):
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), spec="80%", policy=sparsec.rigl(delta_t=2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=40)
    forward = torch.compile(model) if compiled else model
    grown = 0
    for t in range(12):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        grown += sum(updater.step().values())
        opt.zero_grad()
    return grown, [layer.mask() for layer in (model[0], model[2])], list(model.parameters())


@pytest.mark.slow  # over 2 s
def test_compiled_training_through_update_steps_chooses_the_eager_masks():
    eager_grown, eager_masks, eager_params = _train(compiled=False)
    grown, masks, params = _train(compiled=True)
    assert eager_grown > 0 and grown == eager_grown  # six updates that moved weights, in both
    for a, b in zip(masks, eager_masks, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(params, eager_params, strict=True):
        torch.testing.assert_close(a, b)


def test_fullgraph_compile_refuses_an_armed_step():
    """The capture hook is a graph break: fullgraph=True raises on an armed step (README, Backends)."""
    torch.manual_seed(0)
    model = sparsec.sparsify(nn.Sequential(nn.Linear(8, 4)), spec="50%", policy=sparsec.rigl(delta_t=1))
    sparsec.MaskUpdater(model, None, total_steps=10)  # arms step 1 at once
    with pytest.raises(torch._dynamo.exc.Unsupported, match="side effect"):  # the hook mutates the capture
        torch.compile(model, fullgraph=True)(torch.randn(2, 8, requires_grad=True))
