"""Mixed precision (issue 10): under torch.autocast a sparse layer takes the dense layers' half activations
and computes in the autocast dtype, as nn.Linear does; the gradient reaches the fp32 values."""

import pytest
import torch
from helpers import SPECS_AND_SHAPES, assert_close
from torch import nn

import sparsec


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES[::2])
def test_autocast_bf16_matches_a_dense_bf16_reference(spec, out, inn):
    torch.manual_seed(0)
    dense_in = nn.Linear(13, inn)
    layer = sparsec.SparseLinear(inn, out, spec=spec)
    x = torch.randn(9, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.relu(dense_in(x))
        assert h.dtype == torch.bfloat16  # what used to be refused: a bf16 input to fp32 values
        y = layer(h)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    # independent reference: the dense weight, cast to bf16 as autocast casts nn.Linear's weight
    w = layer.dense_weight().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    hr = h.detach()
    y_ref = nn.functional.linear(hr, w.bfloat16(), b.bfloat16())
    y_ref.float().square().sum().backward()
    assert_close(y.float(), y_ref.float(), torch.bfloat16, "y")
    expected = layer.layout.values_from_dense(w.grad, layer.positions())
    scale = expected.abs().max()
    assert_close(layer.values.grad / scale, expected / scale, torch.bfloat16, "dvalues")
    assert_close(layer.bias.grad / b.grad.abs().max(), b.grad / b.grad.abs().max(), torch.bfloat16, "dbias")


def test_rigl_updates_under_autocast():
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), spec="75%", policy=sparsec.rigl(delta_t=2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    x, target = torch.randn(24, 16), torch.randint(0, 4, (24,))
    grown = 0
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()
        grown += sum(updater.step().values())
        opt.zero_grad()
    assert grown > 0 and all(p.dtype == torch.float32 for p in model.parameters())
