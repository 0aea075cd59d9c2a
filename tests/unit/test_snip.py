"""snip: one-shot connection sensitivity |g * w| of the dense model on one batch, per layer."""

import pytest
import torch
from torch import nn

import sparsec


def _model():
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.1, 1.0], [2.0, 1.0, -0.5]]))
    return nn.Sequential(linear)


def _loss(model):
    # dL/dW = c^T x = [[1, 2, 3], [-1, -2, -3]]: |g * w| = [[1, 0.2, 3], [2, 2, 1.5]]
    return (model(torch.tensor([[1.0, 2.0, 3.0]])) * torch.tensor([[1.0, -1.0]])).sum()


@pytest.mark.parametrize(
    "spec,kept",
    [
        ("50%", [2, 3, 4]),  # the three largest; 2 and 2 tie and both fit
        ("fanin(k=1)", [2, 3]),  # per row; row 1's tie goes to the lower column
        ("1:3", [2, 3]),
    ],
)
def test_snip_keeps_the_most_sensitive_connections(spec, kept):
    model = sparsec.sparsify(_model(), spec=spec, policy=sparsec.snip(loss=_loss))
    layer = model[0]
    assert layer.positions().tolist() == kept
    dense = torch.tensor([[1.0, 0.1, 1.0], [2.0, 1.0, -0.5]])
    assert torch.equal(layer.dense_weight(), dense * layer.mask())  # values come from the dense weights


def test_snip_never_changes_the_mask_afterwards():
    model = sparsec.sparsify(_model(), spec="50%", policy=sparsec.snip(loss=_loss))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=50)
    mask = model[0].mask().clone()
    for _ in range(50):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        assert updater.step() == {}
        opt.zero_grad()
    assert torch.equal(model[0].mask(), mask)


def test_snip_needs_its_loss():
    with pytest.raises(sparsec.SparsecError, match=r"pass policy=sparsec.snip\(loss=lambda model: ...\)"):
        sparsec.sparsify(_model(), spec="50%", policy="snip")
    with pytest.raises(sparsec.SparsecError, match="the loss does not depend on layer '1'"):
        model = nn.Sequential(nn.Linear(3, 2), nn.Linear(3, 2))
        sparsec.sparsify(model, spec="50%", policy=sparsec.snip(loss=lambda m: m[0](torch.ones(1, 3)).sum()))


def test_snip_on_blocks_scores_each_block_by_its_mean_sensitivity():
    import copy

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 4))
    reference = copy.deepcopy(dense)
    x = torch.randn(16, 8)
    model = sparsec.sparsify(dense, spec="block(2x4, 50%)", policy=sparsec.snip(loss=lambda m: m(x).square().sum()))
    reference(x).square().sum().backward()
    sensitivity = (reference[0].weight.grad * reference[0].weight).abs().detach()
    block_means = sensitivity.view(2, 2, 2, 4).mean(dim=(1, 3)).reshape(-1)  # 2x2 grid of 2x4 blocks
    expected = sorted(block_means.argsort(descending=True, stable=True)[:2].tolist())
    assert model[0].positions().tolist() == expected
    assert torch.equal(model[0].dense_weight(), reference[0].weight.detach() * model[0].mask())
