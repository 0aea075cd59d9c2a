"""Every policy with every structure: it trains and keeps the structure's invariants at every step, or
refuses at sparsify() with an error that names the policy, the spec and what to use instead."""

import math

import pytest
import torch
from torch import nn

import sparsec

SPECS = ["90%", "2:4", "block(2x4, 75%)", "fanin(75%)", "fanin(k=3)"]
ALL = set(SPECS)
SUPPORTED = {
    "static": ALL,
    "set(delta_t=3)": ALL,
    "rigl(delta_t=3)": ALL,
    "srigl(delta_t=3)": {"fanin(75%)", "fanin(k=3)"},
    "snfs(delta_t=3)": {"90%"},
    "gmp(delta_t=3)": {"90%", "block(2x4, 75%)", "fanin(75%)"},
    "snip": ALL,
    "imp": {"90%"},
    "small_dense": ALL,
}
REFUSAL = {
    "srigl": "srigl keeps a constant fan-in per output, so it needs a fan-in spec",
    "snfs": "snfs moves weights between layers, so layer densities change: it needs unstructured specs",
    "gmp": "gmp prunes toward a sparsity, but spec",
    "imp": "imp prunes by global magnitude across layers, which needs unstructured specs",
}
DYNAMIC = ("set", "rigl", "srigl", "snfs")


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    return model, torch.randn(32, 16), torch.randn(32, 4)


def _sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, sparsec.SparseLinear)]


def _check_invariants(model):
    for layer in _sparse_layers(model):
        layer.layout.check_positions(layer.positions())  # exact counts per unit, sorted, in range
        assert tuple(layer.values.shape) == tuple(layer.layout.values_shape)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("policy", list(SUPPORTED))
def test_policy_trains_on_every_structure_it_supports(policy, spec):
    model, x, y = _model_and_data()
    name = policy.split("(")[0]
    chosen = sparsec.snip(loss=lambda m: (m(x) - y).square().mean()) if name == "snip" else policy
    if spec not in SUPPORTED[policy]:
        with pytest.raises(sparsec.SpecError) as info:
            sparsec.sparsify(model, spec=spec, policy=chosen)
        assert REFUSAL[name] in info.value.message and str(sparsec.parse_spec(spec)) in info.value.message
        return
    model = sparsec.sparsify(model, spec=spec, policy=chosen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step():
        (model(x) - y).square().mean().backward()
        opt.step()

    if name == "small_dense":
        assert not _sparse_layers(model) and all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model)
        step()
        return
    if name == "imp":
        for _ in sparsec.imp_rounds(model, opt):
            for _ in range(3):
                step()
                opt.zero_grad()
            _check_invariants(model)
        target = sum(n - math.floor(0.9 * n) for n in (16 * 16, 16 * 8, 8 * 4))  # every layer's 90% count
        assert sum(m.layout.nnz for m in _sparse_layers(model)) == target
        return
    total = 24
    updater = sparsec.MaskUpdater(model, opt, total_steps=total)
    changed_updates = changed_masks = 0
    for _ in range(total):
        step()
        before = [m.mask().clone() for m in _sparse_layers(model)]
        updater.step()
        opt.zero_grad()
        _check_invariants(model)
        if any(updater.last_dropped.values()):
            changed_updates += 1
            after = [m.mask() for m in _sparse_layers(model)]
            changed_masks += any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    if name in DYNAMIC:
        assert changed_updates >= 3  # updates at t = 3, 6, ..., 15 (t < 0.75 * 24); late ones may drop 0
        # just-dropped weights compete for regrowth (the default), so an update may regrow what it dropped
        assert changed_masks >= 1, changed_masks
    if name == "gmp":  # at the target from t_end on
        target = sparsec.parse_spec(spec)
        assert all(m.spec == target for m in _sparse_layers(model))
