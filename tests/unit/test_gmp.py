"""gmp: the cubic schedule, magnitude pruning with shrinking storage, and its optimizer state."""

import math

import pytest
import torch
from torch import nn

import sparsec
from sparsec import MaskUpdater, SparseLinear, SpecError


def test_cubic_schedule_values():
    p = sparsec.gmp(delta_t=10)
    # s_t = s_f + (s_0 - s_f)(1 - (t - t0)/(t1 - t0))^3 with t0 = 0, t1 = 75 for 100 steps
    assert p.sparsity_at(0, 100, 0.9) == pytest.approx(0.0)
    assert p.sparsity_at(25, 100, 0.9) == pytest.approx(0.9 - 0.9 * (2 / 3) ** 3)
    assert p.sparsity_at(75, 100, 0.9) == pytest.approx(0.9)
    assert p.sparsity_at(99, 100, 0.9) == pytest.approx(0.9)
    assert sparsec.gmp(s_0=0.5).sparsity_at(0, 100, 0.9) == pytest.approx(0.5)
    assert [t for t in range(1, 101) if p.is_update_step(t, 100)] == [10, 20, 30, 40, 50, 60, 70, 75]
    q = sparsec.gmp(delta_t=10, t_start=0.2, t_end=0.5)
    assert [t for t in range(1, 101) if q.is_update_step(t, 100)] == [20, 30, 40, 50]


def test_gmp_needs_a_spec_with_a_sparsity():
    with pytest.raises(SpecError, match="gmp prunes toward a sparsity, but spec 2:4 fixes the density"):
        SparseLinear(16, 8, spec="2:4", policy=sparsec.gmp)
    with pytest.raises(SpecError, match="t_start < t_end"):
        sparsec.gmp(t_start=0.8, t_end=0.5)


@pytest.mark.parametrize("spec", ["90%", "fanin(80%)", "block(2x4, 75%)"])
def test_storage_shrinks_by_magnitude_with_exact_counts(spec):
    torch.manual_seed(0)
    layer = SparseLinear(24, 16, spec=spec, policy=sparsec.gmp(delta_t=5, s_0=0.25))
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    updater = MaskUpdater(layer, opt, total_steps=40)
    target = layer.target_spec
    assert (
        layer.spec.sparsity == 0.25
        and layer.layout.nnz
        == sparsec.SparseLinear(24, 16, spec=type(target)(**{**target.__dict__, "sparsity": 0.25})).layout.nnz
    )
    sizes = [layer.layout.nnz]
    for t in range(1, 41):
        layer(torch.randn(8, 24)).square().sum().backward()
        opt.step()
        before = layer.dense_weight().clone()
        momentum = dict(
            zip(
                layer.positions().tolist(),
                opt.state[layer.values]["momentum_buffer"].reshape(layer.layout.n_items, -1).tolist(),
                strict=True,
            )
        )
        changes = updater.step()
        opt.zero_grad()
        if changes:
            s_t = layer.policy.sparsity_at(t, 40, target.sparsity)
            expected = sparsec.SparseLinear(24, 16, spec=type(target)(**{**target.__dict__, "sparsity": s_t}))
            assert layer.layout.n_items == expected.layout.n_items  # n - floor(s_t n) per unit
            kept = layer.mask()
            assert torch.equal(layer.dense_weight(), before * kept)  # survivors keep their values
            dropped = before[(before != 0) & ~kept].abs()
            if dropped.numel() and isinstance(target, sparsec.Unstructured):
                assert dropped.max() <= before[kept].abs().min()  # the smallest went
            state = opt.state[layer.values]["momentum_buffer"].reshape(layer.layout.n_items, -1).tolist()
            assert state == [momentum[p] for p in layer.positions().tolist()]  # state followed its weight
            sizes.append(layer.layout.nnz)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) > 3
    assert math.isclose(layer.spec.sparsity, target.sparsity)
    assert layer.values in [p for g in opt.param_groups for p in g["params"]]


def test_gmp_in_sparsify_with_erk_reaches_each_layers_target():
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)),
        spec="90%",
        policy=sparsec.gmp(delta_t=10),
        distribution="erk",
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = MaskUpdater(model, opt, total_steps=100)
    for _ in range(100):
        model(torch.randn(4, 20)).sum().backward()
        opt.step()
        updater.step()
        opt.zero_grad()
    for layer in (model[0], model[2]):
        assert layer.spec == layer.target_spec


def test_loading_a_pruned_checkpoint_rewires_the_optimizer_or_says_how():
    def build():
        torch.manual_seed(0)
        layer = SparseLinear(24, 16, spec="90%", policy=sparsec.gmp(delta_t=2))
        opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        return layer, opt, MaskUpdater(layer, opt, total_steps=20)

    layer, opt, updater = build()
    for _ in range(6):
        layer(torch.randn(4, 24)).sum().backward()
        opt.step()
        updater.step()
        opt.zero_grad()
    saved = (layer.state_dict(), opt.state_dict(), updater.state_dict())
    fresh, fresh_opt, fresh_updater = build()
    fresh.load_state_dict(saved[0])
    assert fresh.layout.n_items == layer.layout.n_items < 24 * 16
    with pytest.raises(sparsec.SparsecError, match=r"call updater.load_state_dict"):
        fresh_updater.step()
    fresh_opt.load_state_dict(saved[1])
    fresh_updater.load_state_dict(saved[2])
    assert fresh_opt.param_groups[0]["params"][0] is fresh.values
    assert torch.equal(fresh_opt.state[fresh.values]["momentum_buffer"], opt.state[layer.values]["momentum_buffer"])
