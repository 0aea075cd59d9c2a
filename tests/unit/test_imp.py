"""imp: global magnitude pruning in rounds with learning-rate rewinding (and optional weight rewinding)."""

import math

import pytest
import torch
from torch import nn

import sparsec
from sparsec.spec import unstructured_with


def _model(seed=0):
    torch.manual_seed(seed)
    return sparsec.sparsify(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), spec="80%", policy="imp")


def test_rounds_to_a_target():
    assert sparsec.imp.rounds_to(0.2) == 1
    assert sparsec.imp.rounds_to(0.8) == math.ceil(math.log(0.2) / math.log(0.8))  # 8 rounds of 20%
    assert sparsec.imp(fraction=0.5).rounds_to(0.75) == 2


def test_unstructured_with_keeps_the_exact_count():
    for n, kept in [(100, 72), (80, 64), (7, 1), (1000, 999), (96, 19)]:
        layout = sparsec.formats.make_layout(unstructured_with(n, kept), 1, n)
        assert layout.n_items == kept


def test_rounds_prune_a_fifth_of_what_remains_and_land_on_the_target():
    model = _model()
    assert model[0].layout.nnz == 80 and model[2].layout.nnz == 32  # imp starts dense
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = [model[0].layout.nnz + model[2].layout.nnz for _ in sparsec.imp.rounds(model, opt)]
    # 112 weights at 80%: (80 - floor(64.0)) + (32 - floor(25.6)) = 16 + 7 = 23 kept; round(0.8 * remaining)
    # each round, the last lands on 23
    assert sizes == [112, 90, 72, 58, 46, 37, 30, 24, 23]


def test_one_round_drops_the_globally_smallest():
    model = _model()
    with torch.no_grad():
        model[0].values.copy_(torch.arange(80, dtype=torch.float32) / 10 + 1.0)  # 1.0 .. 8.9
        model[2].values.copy_(torch.linspace(-0.5, 0.5, 32))  # all smaller than layer 0's
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rounds = sparsec.imp_rounds(model, opt)
    next(rounds)  # round 0
    next(rounds)  # prune 20% of 112 -> keep round(89.6) = 90: the 22 smallest are in layer 2
    assert model[0].layout.nnz == 80 and model[2].layout.nnz == 10
    kept = model[2].values.detach().abs()
    assert kept.min() >= torch.linspace(-0.5, 0.5, 32).abs().sort().values[21]


def test_learning_rate_schedule_and_optimizer_state_rewind_each_round():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in sparsec.imp_rounds(model, opt, sched):
        round_lrs = []
        for _ in range(4):
            round_lrs.append(opt.param_groups[0]["lr"])
            model(torch.randn(3, 10)).square().sum().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        lrs.append(round_lrs)
        assert opt.state  # momentum exists at the end of a round ...
    assert all(r == [0.1, 0.1, 0.05, 0.05] for r in lrs)  # ... and each round replays the schedule
    held = opt.param_groups[0]["params"]
    assert any(p is model[0].values for p in held) and any(p is model[2].values for p in held)


def test_weight_rewinding_restores_initial_values_at_kept_positions():
    torch.manual_seed(0)
    model = sparsec.sparsify(nn.Sequential(nn.Linear(10, 8)), spec="50%", policy="imp(rewind=weights, fraction=0.5)")
    initial, bias = model[0].dense_weight().clone(), model[0].bias.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for r in sparsec.imp_rounds(model, opt):
        if r > 0:  # just pruned and rewound
            assert torch.equal(model[0].dense_weight(), initial * model[0].mask())
            assert torch.equal(model[0].bias, bias)
        for _ in range(3):
            model(torch.randn(4, 10)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        assert not torch.equal(model[0].bias, bias)  # training moved them
    assert model[0].layout.nnz == 40


def test_imp_errors():
    with pytest.raises(sparsec.SpecError, match="imp prunes by global magnitude .* unstructured"):
        sparsec.SparseLinear(8, 4, spec="2:4", policy="imp")
    with pytest.raises(sparsec.SparsecError, match="imp_rounds needs layers with policy=sparsec.imp"):
        next(sparsec.imp_rounds(nn.Sequential(sparsec.SparseLinear(8, 4, spec="50%")), None))


def test_global_pruning_never_empties_a_layer():
    """Layer "2" holds 4 tiny weights: at 90% the 11 weights kept by global magnitude would all be layer
    "0"'s. imp used to crash ("sparsity 1.0 is outside [0, 1)"); now layer "2" keeps its largest weight, the
    prune takes the next smallest of layer "0", the total still lands on the target, and it says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 101.0).view(10, 10))
        model[2].weight.copy_(torch.tensor([[1e-3, 4e-3, 2e-3, 3e-3, 1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4]]))
    model = sparsec.sparsify(model, spec="90%", policy=sparsec.imp(fraction=0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.warns(sparsec.SparsecWarning, match="would empty 2"):
        for _ in sparsec.imp_rounds(model, opt):
            pass
    # 110 weights at 90%: (100 - 90) + (10 - 9) = 11 kept; layer "2" keeps its largest (4e-3), layer "0" its 10 largest
    assert model[2].layout.nnz == 1 and model[2].values.detach().tolist() == [pytest.approx(4e-3)]
    assert model[0].layout.nnz == 10
    assert sorted(model[0].values.detach().tolist()) == [float(v) for v in range(91, 101)]
