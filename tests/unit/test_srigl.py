"""srigl: constant fan-in RigL with neuron ablation, on a hand-checked case and on digits."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import sparsec


def test_a_row_without_salient_weights_is_ablated_and_its_budget_shared():
    first = sparsec.SparseLinear(
        8, 4, bias=False, spec="fanin(k=2)", policy=sparsec.srigl(delta_t=1, alpha=0.6, gamma_sal=1.0)
    )
    model = nn.Sequential(first, sparsec.SparseLinear(4, 2, spec="50%", policy=sparsec.static))
    first.write_positions(torch.tensor([0, 1, 8, 9, 16, 17, 24, 25]))  # row r keeps columns 0 and 1
    with torch.no_grad():
        first.values.copy_(torch.tensor([[5.0, 1.0], [5.0, 1.0], [5.0, 5.0], [0.01, 0.01]]))
    updater = sparsec.MaskUpdater(model, torch.optim.SGD(model.parameters(), lr=0.0), total_steps=10**6)
    # dY chosen so that dL/dW = G: rows 0 and 1 have the two largest gradients each, row 3 none
    grad = torch.zeros(4, 8)
    grad[0, 2], grad[0, 3] = 9.0, 8.0
    grad[1, 4], grad[1, 5] = 7.0, 6.0
    grad[2, 6] = 1.0
    (first(torch.eye(8)) * grad.t()).sum().backward()
    updater.step()
    # drop floor(8 * ~0.6) = 4 smallest: row 3's two, then the 1.0s of rows 0 and 1 (lower index first);
    # saliency: row 0 = 1 + 2, row 1 = 1 + 2, row 2 = 2 + 0, row 3 = 0 < 1 (gamma_sal >= 1: a count): ablated;
    # the budget of 8 over 3 rows gives k = 2: rows 0 and 1 regrow their best gradient
    assert first.positions().tolist() == [0, 2, 8, 12, 16, 17]
    assert first.mask().sum(1).tolist() == [2, 2, 2, 0]
    assert updater.last_dropped["0"] == 4


@pytest.mark.parametrize("spec", ["fanin(95%)", "fanin(k=4)"])
def test_constant_fan_in_and_the_last_layer_survive_many_updates(spec):
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)),
        spec=spec,
        policy=sparsec.srigl(delta_t=5, gamma_sal=0.5),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updater = sparsec.MaskUpdater(model, opt, total_steps=100)
    # the reference's budget (condensed-sparsity get_fan_in_after_ablation): int(numel * (1 - s)), or k * out
    budgets = {
        n: 4 * m.out_features if spec == "fanin(k=4)" else int(m.out_features * m.in_features * (1 - 0.95))
        for n, m in updater.layers.items()
    }
    for _ in range(100):
        idx = torch.randint(0, len(y), (64,))
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        updater.step()
        opt.zero_grad()
        for name, layer in updater.layers.items():
            per_row = layer.mask().sum(1)
            alive = per_row > 0
            k = budgets[name] // int(alive.sum())
            assert bool((per_row[alive] == k).all()), name  # every surviving output keeps exactly k
    assert bool((model[4].mask().sum(1) > 0).all())  # the last layer is never ablated
    assert any(bool((m.mask().sum(1) == 0).any()) for m in (model[0], model[2]))  # ablation happened


def test_srigl_needs_a_fan_in_spec():
    with pytest.raises(sparsec.SpecError, match="srigl keeps a constant fan-in per output, so it needs a fan-in spec"):
        sparsec.SparseLinear(8, 4, spec="2:4", policy="srigl")


def _two_layers(gamma_sal: float):
    first = sparsec.SparseLinear(
        8, 4, bias=False, spec="fanin(k=2)", policy=sparsec.srigl(delta_t=1, alpha=0.6, gamma_sal=gamma_sal)
    )
    model = nn.Sequential(first, sparsec.SparseLinear(4, 2, spec="50%", policy=sparsec.static))
    first.write_positions(torch.tensor([0, 1, 8, 9, 16, 17, 24, 25]))  # row r keeps columns 0 and 1
    with torch.no_grad():
        first.values.copy_(torch.tensor([[5.0, 1.0], [5.0, 1.0], [5.0, 5.0], [0.01, 0.01]]))
    updater = sparsec.MaskUpdater(model, torch.optim.SGD(model.parameters(), lr=0.0), total_steps=10**6)
    return first, updater


def _step(first, updater, grad):
    (first(torch.eye(8)) * grad.t()).sum().backward()  # dL/dW = grad
    updater.step()


def test_an_ablated_output_comes_back_when_its_gradient_leads():
    """The reference recomputes the ablated set at every update: row 3, ablated at the first update, is
    salient at the second (the layer's largest gradients are in it) and regrows k = 2 weights."""
    first, updater = _two_layers(gamma_sal=1.0)
    grad = torch.zeros(4, 8)
    grad[0, 2], grad[0, 3], grad[1, 4], grad[1, 5], grad[2, 6] = 9.0, 8.0, 7.0, 6.0, 1.0
    _step(first, updater, grad)
    assert first.mask().sum(1).tolist() == [2, 2, 2, 0]  # the case above: row 3 ablated
    grad = torch.zeros(4, 8)
    grad[3, 5], grad[3, 6] = 50.0, 40.0
    _step(first, updater, grad)
    mask = first.mask()
    assert mask.sum(1).tolist()[3] == 2 and mask[3, 5] and mask[3, 6]  # back, at its two best gradients
    assert int(mask.sum()) == 8 and sorted(set(mask.sum(1).tolist())) in ([2], [0, 2])


def test_gamma_sal_zero_turns_ablation_off():
    first, updater = _two_layers(gamma_sal=0.0)
    grad = torch.zeros(4, 8)
    grad[0, 2], grad[0, 3], grad[1, 4], grad[1, 5], grad[2, 6] = 9.0, 8.0, 7.0, 6.0, 1.0
    _step(first, updater, grad)
    assert first.mask().sum(1).tolist() == [2, 2, 2, 2]  # row 3, with nothing salient, stays


def test_the_threshold_uses_the_fan_in_before_ablation_and_counts_from_one():
    """max(1, int(gamma_sal * k0)) with k0 = floor(K / out) before any ablation; >= 1 is a count."""
    assert sparsec.srigl(gamma_sal=0.3).threshold(10) == 3
    assert sparsec.srigl(gamma_sal=0.05).threshold(10) == 1
    assert sparsec.srigl(gamma_sal=1.0).threshold(10) == 1 and sparsec.srigl(gamma_sal=3).threshold(10) == 3
    assert sparsec.srigl(gamma_sal=0).threshold(10) == 0
    for bad in (-0.1, float("nan"), "0.3"):
        with pytest.raises(sparsec.SpecError, match="gamma_sal"):
            sparsec.srigl(gamma_sal=bad)


def test_ablation_at_gamma_sal_one_does_not_run_away():
    """With the current k in the threshold, ablating raised k, which raised the threshold: at gamma_sal=1.0
    a digits MLP at 98% ran away to 8 of 256 active outputs. The reference's k0 and count keep most."""
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)),
        spec="fanin(90%)",
        policy=sparsec.srigl(delta_t=5, gamma_sal=1.0),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updater = sparsec.MaskUpdater(model, opt, total_steps=200)
    for _ in range(200):
        idx = torch.randint(0, len(y), (64,))
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        updater.step()
        opt.zero_grad()
    assert int((model[0].mask().sum(1) > 0).sum()) >= 128


def test_k_floors_over_the_layer_as_the_reference():
    """k = int(out * in * (1 - s)) // out: 98% of 64 inputs on 256 outputs keeps int(327.68) // 256 = 1 per
    output (rounding per row would keep 64 - floor(62.72) = 2), and 98% of 256x256 keeps 1310 // 256 = 5."""
    assert sparsec.SparseLinear(64, 256, spec="fanin(98%)", policy="srigl").mask().sum(1).unique().tolist() == [1]
    assert sparsec.SparseLinear(256, 256, spec="fanin(98%)", policy="srigl").mask().sum(1).unique().tolist() == [5]
    assert sparsec.SparseLinear(64, 256, spec="fanin(98%)", policy="rigl").mask().sum(1).unique().tolist() == [2]
