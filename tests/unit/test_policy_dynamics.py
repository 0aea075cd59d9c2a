"""Dynamic policies really change the mask at their scheduled updates (an update that silently changes
nothing is a defect a peer library ships). Real data: digits.

Every scheduled update with a positive drop count drops that many weights and grows as many fresh
positions (the default ``regrow_dropped=False``): the test counts the positions that left and joined
the mask at every update. srigl may also empty ablated rows and hand their budget to the survivors,
so it removes at least what it dropped and grows at least one position."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import sparsec
from sparsec.policies.decision import n_drop_for

CASES = [(p, s) for p in ("rigl(delta_t=10)", "set(delta_t=10)") for s in ("90%", "fanin(90%)", "2:4")]


def _train_on_digits(spec, policy, seed: int, total: int = 200):
    """Train a sparse 64-128-10 MLP (layer "0" sparse) on digits; after every ``updater.step()`` yield
    the step, layer 0's mask before and after it, the changes it returned, and the updater."""
    digits = load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:512])
    torch.manual_seed(seed)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), spec=spec, policy=policy, dense=["2"]
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updater = sparsec.MaskUpdater(model, opt, total_steps=total)
    for t in range(1, total + 1):
        idx = torch.randint(0, 512, (64,))
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        before = model[0].mask().clone()
        changes = updater.step()
        opt.zero_grad()
        yield t, before, model[0].mask(), changes, updater


@pytest.mark.parametrize("policy,spec", [*CASES, ("snfs(delta_t=10)", "90%"), ("srigl(delta_t=10)", "fanin(90%)")])
def test_fresh_first_regrowth_changes_the_mask_at_every_update(policy, spec):
    total, updates = 200, 0
    policy = policy.replace(")", ", regrow_dropped=False)")
    for t, before, after, changes, updater in _train_on_digits(spec, policy, seed=0, total=total):
        layer = updater.layers["0"]
        n_drop = n_drop_for(layer.layout, layer.policy.drop_fraction(t, total))
        if layer.policy.is_update_step(t, total) and n_drop:
            updates += 1
            removed, added = int((before & ~after).sum()), int((after & ~before).sum())
            assert updater.last_dropped["0"] == n_drop, t  # the update ran and dropped what it should
            assert changes["0"] == added, (t, added, changes)  # and reports what it changed
            if policy.startswith("srigl"):
                assert removed >= n_drop and added > 0, (t, removed, added)
            else:
                assert removed == added == n_drop, (t, removed, added, n_drop)
    assert updates >= 10


@pytest.mark.parametrize("policy,spec", [*CASES, ("snfs(delta_t=10)", "90%")])
def test_by_default_an_update_regrows_what_it_dropped_among_all_candidates(policy, spec):
    """The published rule: n dropped, n regrown among fresh and just-dropped positions, so the mask moves by
    at most n (and the changes reported are the positions that really moved)."""
    total, updates, moved = 200, 0, 0
    for t, before, after, changes, updater in _train_on_digits(spec, policy, seed=0, total=total):
        layer = updater.layers["0"]
        assert layer.policy.regrow_dropped  # the default
        n_drop = n_drop_for(layer.layout, layer.policy.drop_fraction(t, total))
        if layer.policy.is_update_step(t, total) and n_drop:
            updates += 1
            removed, added = int((before & ~after).sum()), int((after & ~before).sum())
            assert updater.last_dropped["0"] == n_drop, t
            assert changes["0"] == added and removed == added <= n_drop, (t, removed, added, n_drop)
            moved += added
    assert updates >= 10 and moved > 0


def test_regrow_dropped_can_leave_late_updates_unchanged():
    """The reference behaviour, kept behind ``regrow_dropped=True``: with fan-in, a row's freshly grown
    weight is still small at the next update, so it is dropped, and its gradient still leads the row,
    so it comes back and the update changes nothing."""
    changed = _rigl_changes("fanin(90%)", regrow_dropped=True)
    assert 0 in changed and len(changed) >= 10
    assert 0 not in _rigl_changes("fanin(90%)", regrow_dropped=False)


def _rigl_changes(spec: str, regrow_dropped: bool) -> list[int]:
    """Positions changed in layer 0 at every update that dropped weights."""
    policy = sparsec.rigl(delta_t=10, regrow_dropped=regrow_dropped)
    return [
        int((before != after).sum())
        for _, before, after, _, updater in _train_on_digits(spec, policy, seed=1)
        if updater.last_dropped.get("0")
    ]
