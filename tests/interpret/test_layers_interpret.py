"""Sparse layers on the interpret backend (generated kernels in Triton's interpreter) agree with the
cpu backend, and MaskUpdater works unchanged on it."""

import pytest
import torch
from helpers import assert_interpret_matches_cpu, assert_kernel_close

import sparsec
from sparsec import config

CASES = [("90%", 37, 53), ("2:4", 37, 52), ("block(16x16, 50%)", 48, 80), ("fanin(k=7)", 37, 53), ("1:3", 19, 33)]


@pytest.mark.parametrize("spec,out,inn", CASES)
def test_layer_on_interpret_backend_matches_cpu_backend(spec, out, inn):
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(inn, out, spec=spec)
    assert_interpret_matches_cpu(layer, torch.randn(11, inn, requires_grad=True))


def test_mask_updater_trains_on_the_interpret_backend(monkeypatch):
    import sparsec.runtime.grow as grow

    kernel_grows = []
    original = grow.grow_on_kernels
    monkeypatch.setattr(grow, "grow_on_kernels", lambda *a, **k: kernel_grows.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        sparsec.SparseLinear(24, 16, spec="2:4", policy=sparsec.set_(delta_t=2)),
        torch.nn.ReLU(),
        sparsec.SparseLinear(16, 4, spec="50%", policy=sparsec.rigl(delta_t=2)),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    x, target = torch.randn(32, 24), torch.randint(0, 4, (32,))
    changed, losses = 0, []
    with config.patch(backend="interpret"):
        for _ in range(8):
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            changed += sum(updater.step().values())
            opt.zero_grad()
            losses.append(loss.item())
    assert changed > 0 and losses[-1] < losses[0]
    assert len(kernel_grows) == 4  # RigL's updates at steps 2, 4, 6, 8 grew on the generated kernel
    assert int(model[0].mask().view(16, -1, 4).sum(-1).eq(2).all())


def test_float32_follows_torch_matmul_precision():
    """set_float32_matmul_precision("high") selects the TF32 kernels (IEEE under "highest")."""
    from sparsec.dtypes import name_of as kernel_dtype

    torch.manual_seed(0)
    layer = sparsec.SparseLinear(52, 37, spec="2:4")
    x = torch.randn(11, 52)
    before = torch.get_float32_matmul_precision()
    try:
        assert kernel_dtype(torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert kernel_dtype(torch.float32) == "tf32"
        with config.patch(backend="interpret"):
            y = layer(x)  # the interpreter multiplies in fp32 whatever the precision flag says
        with config.patch(backend="cpu"):
            assert_kernel_close(y, layer(x), torch.float32, "tf32 kernels")
    finally:
        torch.set_float32_matmul_precision(before)


def test_nan_gradient_on_the_interpret_backend_skips_the_update():
    layer = sparsec.SparseLinear(24, 16, spec="fanin(k=6)", policy=sparsec.rigl(delta_t=1))
    updater = sparsec.MaskUpdater(layer, torch.optim.SGD(layer.parameters(), lr=0.1), total_steps=50)
    mask = layer.mask().clone()
    x = torch.randn(8, 24)
    x[0, 0] = float("nan")
    with config.patch(backend="interpret"), pytest.warns(sparsec.SparsecWarning, match="NaN or Inf"):
        layer(x).sum().backward()
        updater.step()
    assert torch.equal(layer.mask(), mask)
