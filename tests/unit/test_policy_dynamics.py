"""Dynamic policies really change the mask at their scheduled updates (an update that silently changes
nothing is a defect a peer library ships). Real data: digits.

Every scheduled update with a positive drop count must drop that many weights. SET must then change
the mask every time. RigL may regrow a just-dropped weight when its gradient ranks among its unit's
best (the pinned convention: just-dropped positions are eligible), so late updates that drop a few
freshly grown, still-small weights can regrow exactly those; the test requires that such updates
stay a small minority and that every change is counted."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import sparsec
from sparsec.policies.decision import n_drop_for

CASES = [(p, s) for p in ("rigl(delta_t=10)", "set(delta_t=10)") for s in ("90%", "fanin(90%)", "2:4")]


@pytest.mark.parametrize("policy,spec", [*CASES, ("snfs(delta_t=10)", "90%"), ("srigl(delta_t=10)", "fanin(90%)")])
def test_every_update_changes_the_mask(policy, spec):
    digits = load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:512])
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), spec=spec, policy=policy, dense=["2"]
    )
    layer = model[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    total = 200
    updater = sparsec.MaskUpdater(model, opt, total_steps=total)
    updates, unchanged = 0, 0
    for t in range(1, total + 1):
        idx = torch.randint(0, 512, (64,))
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        before = layer.mask().clone()
        changes = updater.step()
        opt.zero_grad()
        n_drop = n_drop_for(layer.layout, layer.policy.drop_fraction(t, total))
        if layer.policy.is_update_step(t, total) and n_drop:
            updates += 1
            assert updater.last_dropped["0"] == n_drop  # the update ran and dropped what it should
            changed = int((before != layer.mask()).sum()) // 2
            assert changes["0"] == changed, (t, changed, changes)
            if policy.startswith(("set", "snfs")):
                assert changed > 0, t
            unchanged += changed == 0
    assert updates >= 10 and unchanged <= updates // 5
