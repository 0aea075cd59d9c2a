"""The conventions of README 'Mask updates', pinned on small hand-checked cases."""

import warnings
from dataclasses import dataclass

import pytest
import torch
from helpers import SPECS_AND_SHAPES
from torch import nn

import sparsec
from sparsec import MaskUpdater, SparsecWarning, SparseLinear, config, rigl_step
from sparsec.formats import make_layout
from sparsec.policies.base import Change, Policy
from sparsec.policies.decision import choose_drops, remap_positions, survivor_mask
from sparsec.runtime.selection import GrowSelector


def mask_of(rows):
    return torch.tensor(rows, dtype=torch.bool)


# --- rigl_step: the decision on dense tensors --------------------------------------------------------


def test_drop_smallest_magnitude_grow_largest_gradient():
    mask = mask_of([[1, 1, 0, 0, 1], [0, 1, 0, 1, 0]])  # 5 of 10 kept: spec 50%
    weight = torch.tensor([[5.0, -0.1, 9, 9, 3], [9, 4, 9, 0.2, 9]])
    grad = torch.tensor([[0.0, 0, 1, 7, 0], [2, 0, 8, 0, 0.5]])
    new = rigl_step(mask, weight, grad, 0.4, "50%")  # floor(5 * 0.4) = 2: drop |w| 0.1 and 0.2
    expected = mask_of([[1, 0, 0, 1, 1], [0, 1, 1, 0, 0]])  # grow grad 8 and 7
    assert torch.equal(new, expected)


def test_ties_go_to_the_lower_flat_index():
    mask = mask_of([[1, 1, 1, 0, 0, 0]])
    weight = torch.tensor([[1.0, 1.0, 1.0, 0, 0, 0]])
    grad = torch.tensor([[0.0, 0, 0, 3, 3, 3]])
    new = rigl_step(mask, weight, grad, 0.5, "50%")  # drop 1 of 3 tied -> index 0; grow tied -> index 3
    assert torch.equal(new, mask_of([[0, 1, 1, 1, 0, 0]]))


def test_fresh_first_regrowth_takes_fresh_positions_so_every_drop_changes_the_mask():
    mask = mask_of([[1, 1, 0, 0]])
    weight = torch.tensor([[0.1, 5.0, 0, 0]])
    grad = torch.tensor([[9.0, 0, 1, 2]])  # the dropped weight has the largest gradient
    new = rigl_step(mask, weight, grad, 0.5, "50%", regrow_dropped=False)
    assert torch.equal(new, mask_of([[0, 1, 0, 1]]))


def test_by_default_just_dropped_positions_compete_as_in_the_paper():
    mask = mask_of([[1, 1, 0, 0]])
    weight = torch.tensor([[0.1, 5.0, 0, 0]])
    grad = torch.tensor([[9.0, 0, 1, 2]])  # the dropped weight has the largest gradient: it is regrown
    assert torch.equal(rigl_step(mask, weight, grad, 0.5, "50%"), mask)


def test_a_unit_short_of_fresh_positions_regrows_its_best_dropped():
    mask = mask_of([[1, 1, 1, 0, 1, 1, 1, 0]])  # 3:4: one fresh position per group
    weight = torch.tensor([[0.1, 0.2, 0.3, 0, 5, 6, 7, 0]])
    grad = torch.tensor([[4.0, 6, 5, 1, 0, 0, 0, 9]])
    # drop floor(6 * 0.5) = 3, all in group 0; it grows its fresh position 3, then its best dropped: 1, 2
    new = rigl_step(mask, weight, grad, 0.5, "3:4", regrow_dropped=False)
    assert torch.equal(new, mask_of([[0, 1, 1, 1, 1, 1, 1, 0]]))


def test_nm_groups_keep_exactly_n():
    mask = mask_of([[1, 1, 0, 0, 1, 1, 0, 0]])  # 2:4, two groups
    weight = torch.tensor([[0.1, 0.2, 0, 0, 5, 6, 0, 0]])
    grad = torch.tensor([[0.0, 0, 1, 2, 0, 0, 9, 9]])
    # layer-wide drop of floor(4 * 0.5) = 2: both in group 0 (|w| 0.1, 0.2); group 0 regrows 2 of
    # its own 4 positions; group 1's large gradients cannot be taken by group 0.
    new = rigl_step(mask, weight, grad, 0.5, "2:4")
    assert torch.equal(new, mask_of([[0, 0, 1, 1, 1, 1, 0, 0]]))


def test_fanin_rows_keep_exactly_k():
    mask = mask_of([[1, 1, 0, 0], [1, 1, 0, 0]])
    weight = torch.tensor([[0.1, 5, 0, 0], [0.2, 6, 0, 0]])
    grad = torch.tensor([[0.0, 0, 0.5, 0], [0, 0, 9, 8]])
    new = rigl_step(mask, weight, grad, 0.5, "fanin(k=2)")  # drop 0.1 (row 0) and 0.2 (row 1)
    assert torch.equal(new, mask_of([[0, 1, 1, 0], [0, 1, 1, 0]]))


def test_blocks_are_scored_by_mean_magnitude():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = mask[2:, 2:] = True  # blocks 0 and 3 of a 2x2 grid of 2x2 blocks
    weight = torch.zeros(4, 4)
    weight[:2, :2] = torch.tensor([[10.0, 0], [0, 0]])  # mean |w| 2.5
    weight[2:, 2:] = 1.0  # mean 1.0 though its max is smaller
    grad = torch.zeros(4, 4)
    grad[:2, 2:] = torch.tensor([[4.0, 0], [0, 0]])  # block 1: mean 1.0
    grad[2:, :2] = 0.9  # block 2: mean 0.9, larger max would not matter
    new = rigl_step(mask, weight, grad, 0.5, "block(2x2, 50%)")
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = expected[:2, 2:] = True
    assert torch.equal(new, expected)


def test_rigl_step_rejects_masks_that_break_the_spec():
    with pytest.raises(sparsec.ShapeError, match="unit 0 .* keeps 3 instead of 2"):
        rigl_step(mask_of([[1, 1, 1, 0, 0, 0, 0, 1]]), torch.ones(1, 8), torch.ones(1, 8), 0.3, "2:4")
    with pytest.raises(sparsec.ShapeError, match="partly kept 2x2 blocks"):
        m = torch.zeros(2, 4, dtype=torch.bool)
        m[0, 0] = m[1, 0] = True
        rigl_step(m, torch.ones(2, 4), torch.ones(2, 4), 0.3, "block(2x2, 50%)")


def test_rigl_step_nan_leaves_mask_unchanged():
    mask = mask_of([[1, 1, 0, 0]])
    with pytest.warns(SparsecWarning, match="NaN or Inf"):
        new = rigl_step(mask, torch.ones(1, 4), torch.tensor([[0, 1, float("nan"), 0]]), 0.5, "50%")
    assert torch.equal(new, mask)


# --- MaskUpdater on compressed layers ------------------------------------------------------------------


def _layer(spec, out, inn, policy, flat=None, values=None):
    layer = SparseLinear(inn, out, bias=False, spec=spec, policy=policy)
    if flat is not None:
        layer.write_positions(torch.tensor(flat))
    if values is not None:
        layer.values.data.copy_(torch.tensor(values))
    return layer


def _train_step(layer, opt, updater, grad_dense):
    """One step whose dense weight gradient is exactly ``grad_dense`` (x = I, dY = grad^T)."""
    x = torch.eye(layer.in_features)
    (layer(x) * grad_dense.t()).sum().backward()
    opt.step()
    changes = updater.step()
    opt.zero_grad()
    return changes


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.0),
        lambda p: torch.optim.AdamW(p, lr=0.0, amsgrad=True),
    ],
)
def test_grown_weights_and_state_start_at_zero_survivors_keep_theirs(make_opt):
    # 1x6 layer, 50%: kept flat 0, 1, 2. alpha=0.5 at t=1 of 10**6 steps drops floor(3 * ~0.5) = 1.
    layer = _layer("50%", 1, 6, sparsec.rigl(delta_t=1, alpha=0.5), flat=[0, 1, 2], values=[0.5, 0.1, 3.0])
    opt = make_opt(layer.parameters())
    updater = MaskUpdater(layer, opt, total_steps=10**6)
    (layer(torch.eye(6)) * torch.tensor([[1.0, 2.0, 3.0, 0.0, 6.0, 5.0]]).t()).sum().backward()
    opt.step()
    state = opt.state[layer.values]
    per_weight = {k: v.clone() for k, v in state.items() if v.shape == layer.values.shape}
    assert per_weight and all(bool((v != 0).all()) for v in per_weight.values())
    assert updater.step() == {"": 1}
    assert layer.positions().tolist() == [0, 2, 4]  # drop |w|=0.1 at 1, grow |grad|=6 at 4
    assert layer.values.tolist() == [0.5, 3.0, 0.0]
    for key, old in per_weight.items():
        assert torch.equal(state[key], torch.stack([old[0], old[2], torch.zeros(())])), key
    assert "step" not in state or float(state["step"]) == 1.0  # scalar state untouched


def test_an_update_lets_go_of_the_spent_gradient_a_skipped_one_keeps_it():
    """The last step's gradient is laid out by the old slots (the optimizer step used it): an update that
    moves the mask drops it, as zero_grad() would, so no later step reads it against the new positions."""
    layer = _layer("50%", 1, 6, sparsec.rigl(delta_t=1, alpha=0.5), flat=[0, 1, 2], values=[0.5, 0.1, 3.0])
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    updater = MaskUpdater(layer, opt, total_steps=10**6)
    (layer(torch.eye(6)) * torch.tensor([[1.0, 2.0, 3.0, 0.0, 6.0, 5.0]]).t()).sum().backward()
    opt.step()
    assert layer.values.grad is not None
    assert updater.step() == {"": 1}
    assert layer.values.grad is None
    (layer(torch.eye(6)) * float("nan")).sum().backward()  # a NaN score: the update is skipped
    opt.step()
    with pytest.warns(SparsecWarning):
        assert updater.step() == {}
    assert layer.values.grad is not None  # nothing moved: the gradient is the user's to clear


def test_dropped_and_regrown_keeps_value_and_state():
    """The default rule really drops and regrows: of the two weights dropped, the one whose gradient leads
    comes back with its value and momentum; the other's place goes to a fresh position starting at zero."""
    # 1x6 layer, 50%: kept flat 0, 1, 2 with |w| 0.1, 5, 3. alpha=0.7 at t=1 drops floor(3 * ~0.7) = 2: 0.1, 3.
    layer = _layer("50%", 1, 6, sparsec.rigl(delta_t=1, alpha=0.7), flat=[0, 1, 2], values=[0.1, 5.0, 3.0])
    opt = torch.optim.SGD(layer.parameters(), lr=0.0, momentum=0.9)
    updater = MaskUpdater(layer, opt, total_steps=10**6)
    # candidates after the drop: 0 (just dropped, |grad| 9), 2 (just dropped, 0.5), 3 (fresh, 2), 4, 5 (0)
    changes = _train_step(layer, opt, updater, torch.tensor([[9.0, 1.0, 0.5, 2.0, 0.0, 0.0]]))
    assert updater.last_dropped[""] == 2
    assert layer.positions().tolist() == [0, 1, 3] and changes == {"": 1}  # 0 regrown, 2 -> 3
    assert torch.equal(layer.values, torch.tensor([0.1, 5.0, 0.0]))
    assert opt.state[layer.values]["momentum_buffer"].tolist() == [9.0, 1.0, 0.0]


def test_set_is_seeded_and_static_never_changes():
    def run(seed, policy):
        torch.manual_seed(1)
        layer = SparseLinear(20, 10, spec="80%", policy=policy)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        updater = MaskUpdater(layer, opt, total_steps=100, seed=seed)
        masks = []
        for _ in range(30):
            layer(torch.randn(4, 20)).square().sum().backward()
            opt.step()
            updater.step()
            opt.zero_grad()
            masks.append(layer.mask().clone())
        return masks

    a, b, c = (
        run(0, sparsec.set_(delta_t=5)),
        run(0, sparsec.set_(delta_t=5)),
        run(1, sparsec.set_(delta_t=5)),
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[-1], c[-1])
    assert not torch.equal(a[3], a[4])  # step 5 changed the mask
    s = run(0, sparsec.static)
    assert all(torch.equal(s[0], m) for m in s)


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
def test_updater_matches_rigl_step_on_the_dense_gradient(spec, out, inn):
    """The chunked, compressed grow step chooses exactly what the dense reference chooses."""
    torch.manual_seed(3)
    layer = SparseLinear(inn, out, spec=spec, policy=sparsec.rigl(delta_t=1, alpha=0.6), dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    updater = MaskUpdater(layer, opt, total_steps=1000)
    x = torch.randn(9, inn, dtype=torch.float64)
    before = layer.mask().clone()
    w = layer.dense_weight().requires_grad_()
    (x @ w.t() + layer.bias).tanh().sum().backward()  # the dense gradient, for the reference only
    with config.patch(grow_chunk_bytes=inn * 8 * 2):  # several chunks of output rows
        layer(x).tanh().sum().backward()
    opt.step()
    f = layer.policy.drop_fraction(1, 1000)
    expected = rigl_step(before.view(out, -1), w.detach(), w.grad, f, spec)  # w: the weight the step used
    changes = updater.step()
    assert changes[""] > 0
    assert torch.equal(layer.mask(), expected)


@pytest.mark.parametrize("spec", ["80%", "1:3", "block(2x3, 50%)", "fanin(k=7)"])
def test_conv_updater_matches_rigl_step(spec):
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 6, 3, padding=1, dtype=torch.float64)  # fan-in 18
    layer = sparsec.SparseConv2d.from_dense(conv, spec, sparsec.rigl(delta_t=1, alpha=0.6))
    updater = MaskUpdater(layer, torch.optim.SGD(layer.parameters(), lr=0.1), total_steps=1000)
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    before = layer.mask().clone()
    w = layer.dense_weight().requires_grad_()
    r = torch.randn(3, 6, 5, 4, dtype=torch.float64)  # a random projection: unstructured gradients
    (nn.functional.conv2d(x, w, layer.bias, padding=1) * r).sum().backward()
    (layer(x) * r).sum().backward()
    expected = rigl_step(before, w.detach(), w.grad, layer.policy.drop_fraction(1, 1000), spec)
    assert updater.step()[""] > 0
    assert torch.equal(layer.mask(), expected)


SMALL = [("90%", 13, 17), ("2:4", 9, 16), ("3:8", 5, 24), ("block(2x3, 60%)", 10, 12), ("fanin(k=3)", 11, 7)]


def _random_update(layout, kept, gen, n_drop, scores, chunk=3, regrow_dropped=False):
    """Drop by random integer scores (many ties), then grow from ``scores`` fed in chunks."""
    drop = torch.randint(0, 4, (layout.n_items,), generator=gen).float()
    dropped = choose_drops(drop, n_drop)
    selector = GrowSelector(layout, kept, dropped, regrow_dropped=regrow_dropped)
    for r0 in range(0, layout.grid[0], chunk):
        selector.add_rows(r0, scores[r0 : r0 + chunk].clone())
    return dropped, selector


@pytest.mark.parametrize("spec,out,inn", SMALL)
def test_invariants_hold_after_1000_random_updates(spec, out, inn):
    layout = make_layout(sparsec.parse_spec(spec), out, inn)
    gen = torch.Generator().manual_seed(0)
    kept = layout.random_positions(gen)
    for _ in range(1000):
        n_drop = int(torch.randint(0, layout.n_items + 1, (1,), generator=gen))
        scores = torch.randint(0, 4, layout.grid, generator=gen).float()
        dropped, selector = _random_update(layout, kept, gen, n_drop, scores)
        kept_new, src = remap_positions(kept, survivor_mask(kept, dropped), selector.grown())
        layout.check_positions(kept_new, what="updated mask")
        # independent checks on the dense item mask
        item_mask = torch.zeros(layout.grid[0] * layout.grid[1], dtype=torch.bool)
        item_mask[kept_new] = True
        assert int(item_mask.sum()) == layout.n_items
        per_unit = item_mask.view(-1, layout.unit_size).sum(1)
        assert bool((per_unit == layout.kept_per_unit).all())
        # every lost item comes back fresh while its unit has fresh positions: the mask changes that much
        lost = torch.bincount(kept[dropped] // layout.unit_size, minlength=layout.n_units)
        assert int((src < 0).sum()) == int(lost.clamp(max=layout.unit_size - layout.kept_per_unit).sum())
        survivors = src >= 0
        assert torch.equal(kept_new[survivors], kept[src[survivors]])  # a slot keeps its position
        kept = kept_new


@pytest.mark.parametrize("regrow_dropped", [False, True])
@pytest.mark.parametrize("spec,out,inn", SMALL)
def test_chunked_growth_equals_a_brute_force_choice_with_ties(spec, out, inn, regrow_dropped):
    layout = make_layout(sparsec.parse_spec(spec), out, inn)
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        kept = layout.random_positions(gen)
        scores = torch.randint(0, 3, layout.grid, generator=gen).double()  # many ties
        n_drop = int(torch.randint(0, layout.n_items + 1, (1,), generator=gen))
        chunk = int(torch.randint(1, 4, (1,), generator=gen))
        dropped, selector = _random_update(layout, kept, gen, n_drop, scores, chunk, regrow_dropped)
        just_dropped = set(kept[dropped].tolist())
        survivors = set(kept.tolist()) - just_dropped
        lost = torch.bincount(kept[dropped] // layout.unit_size, minlength=layout.n_units).tolist()
        expected = []
        for u in range(layout.n_units):
            eligible = [p for p in range(u * layout.unit_size, (u + 1) * layout.unit_size) if p not in survivors]
            # fresh positions first unless just-dropped ones compete; then score, then flat index
            eligible.sort(key=lambda p: (not regrow_dropped and p in just_dropped, -scores.view(-1)[p].item(), p))
            expected += eligible[: lost[u]]
        assert selector.grown().tolist() == sorted(expected), trial


def test_nan_gradient_skips_update_and_warns_once_per_layer():
    model = nn.Sequential(
        SparseLinear(6, 5, spec="50%", policy=sparsec.rigl(delta_t=1)),
        SparseLinear(5, 3, spec="50%", policy=sparsec.rigl(delta_t=1)),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = MaskUpdater(model, opt, total_steps=100)
    masks = [m.mask().clone() for m in model]
    with pytest.warns(SparsecWarning) as record:
        for _ in range(3):
            x = torch.randn(4, 6)
            x[0, 0] = float("nan")
            model(x).sum().backward()
            values = [m.values.detach().clone() for m in model]
            updater.step()  # no optimizer step: values must stay exactly as they are
            opt.zero_grad()
            assert all(torch.equal(m.mask(), k) for m, k in zip(model, masks, strict=True))
            assert all(torch.equal(m.values, v) for m, v in zip(model, values, strict=True))
    assert len(record) == 2 and {str(r.message).split(":")[0] for r in record} == {"0", "1"}
    assert "NaN or Inf" in str(record[0].message)


def test_update_without_backward_warns_and_keeps_the_mask():
    layer = SparseLinear(6, 5, spec="50%", policy=sparsec.rigl(delta_t=1))
    updater = MaskUpdater(layer, torch.optim.SGD(layer.parameters(), lr=0.1), total_steps=100)
    mask = layer.mask().clone()
    with pytest.warns(SparsecWarning, match="no backward ran"):
        updater.step()
    assert torch.equal(layer.mask(), mask)


class _Armings:
    """Per-layer state of ``_LowestFresh``: how often the layer was armed (checkpointed by the updater)."""

    def __init__(self):
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


@dataclass(frozen=True)
class _LowestFresh(Policy):
    """A policy written outside sparsec: at every step but the third, each layer drops its smallest |w|
    and grows its lowest fresh position; the third step is skipped."""

    def is_update_step(self, t: int, total_steps: int) -> bool:
        return True

    def layer_state(self, layer, optimizer):
        return _Armings()

    def arm(self, layer, ctx, state):
        state.count += 1

    @classmethod
    def update(cls, due, captures, ctx):
        changes = {}
        for name, layer in due.items():
            if ctx.t == 3:
                changes[name] = "the third step"
                continue
            kept = layer.positions()
            dropped = choose_drops(layer.values.detach().abs(), 1)
            fresh = torch.ones(layer.layout.out_features * layer.layout.in_features, dtype=torch.bool)
            fresh[kept] = False
            flat, src = remap_positions(kept, survivor_mask(kept, dropped), fresh.nonzero().flatten()[:1])
            changes[name] = Change(flat, src, dropped=1)
        return changes


def test_a_policy_behind_the_protocol_is_scheduled_applied_reported_and_checkpointed():
    torch.manual_seed(0)
    layer = SparseLinear(4, 3, spec="50%", policy=_LowestFresh())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    updater = MaskUpdater(layer, opt, total_steps=10)
    for t in range(1, 5):
        layer(torch.randn(2, 4)).sum().backward()
        opt.step()
        kept = layer.positions().clone()
        smallest = kept[layer.values.detach().abs().argmin()]
        if t == 3:
            with pytest.warns(SparsecWarning, match="step 3 skipped: the third step; mask and values are unchanged"):
                assert updater.step() == {}
            assert torch.equal(layer.positions(), kept)
            continue
        assert updater.step() == {"": 1} and updater.last_dropped == {"": 1}
        now = layer.positions()
        grown = now[~torch.isin(now, kept)]
        assert smallest not in now and grown.tolist() == [int((~torch.isin(torch.arange(12), kept)).nonzero()[0])]
        slot = int((now == grown).nonzero())
        assert layer.values[slot] == 0 and opt.state[layer.values]["momentum_buffer"][slot] == 0
    state = updater.state_dict()
    assert state["momentum"] == {"": {"count": 5}}  # armed at construction and after each of 4 steps
    fresh = MaskUpdater(layer, opt, total_steps=10)
    fresh.load_state_dict(state)
    assert fresh._states[""].count == 6  # loaded, then armed for the next step


def test_updater_setup_errors():
    layer = SparseLinear(6, 5, spec="50%")
    with pytest.raises(sparsec.SparsecError, match="optimizer does not hold the sparse values"):
        MaskUpdater(layer, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), total_steps=10)
    with pytest.raises(sparsec.SparsecError, match="no sparse layers"):
        MaskUpdater(nn.Linear(3, 3), None, total_steps=10)
    with pytest.raises(sparsec.SparsecError, match="total_steps=0"):
        MaskUpdater(layer, None, total_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskUpdater(layer, None, total_steps=10)


@pytest.mark.parametrize("regrow_dropped", [False, True])
def test_growth_to_per_row_needs_equals_a_brute_force_choice(regrow_dropped):
    """srigl's form: rows of any kept count regrow ``need[r]``, fresh positions first."""
    out, inn = 9, 11
    layout = make_layout(sparsec.parse_spec("fanin(k=1)"), out, inn)  # units are rows
    gen = torch.Generator().manual_seed(2)
    for trial in range(50):
        kept = (torch.rand(out * inn, generator=gen) < 0.7).nonzero().flatten()
        dropped = (torch.rand(kept.numel(), generator=gen) < 0.5).nonzero().flatten()
        survivors = set(kept.tolist()) - set(kept[dropped].tolist())
        room = inn - torch.bincount(torch.tensor(sorted(survivors), dtype=torch.int64) // inn, minlength=out)
        need = (torch.rand(out, generator=gen) * (room + 1)).long().clamp(max=room)
        scores = torch.randint(0, 3, (out, inn), generator=gen).double()
        selector = GrowSelector(layout, kept, dropped, need=need, regrow_dropped=regrow_dropped)
        for r0 in range(0, out, 2):
            selector.add_rows(r0, scores[r0 : r0 + 2].clone())
        just_dropped = set(kept[dropped].tolist())
        expected = []
        for r in range(out):
            eligible = [p for p in range(r * inn, (r + 1) * inn) if p not in survivors]
            eligible.sort(key=lambda p: (not regrow_dropped and p in just_dropped, -scores.view(-1)[p].item(), p))
            expected += eligible[: int(need[r])]
        assert selector.grown().tolist() == sorted(expected), trial


@pytest.mark.parametrize("spec", ["90%", "fanin(k=3)", "2:4"])
def test_a_layer_called_twice_in_a_step_grows_by_the_steps_whole_gradient(spec):
    """Weight sharing (or micro-batches before one optimizer step): the grow score is |dY_1^T X_1 + dY_2^T X_2|,
    the step's dense gradient, not either call's."""
    torch.manual_seed(5)
    out, inn = 10, 16
    layer = SparseLinear(inn, out, spec=spec, policy=sparsec.rigl(delta_t=1, alpha=0.6), dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    updater = MaskUpdater(layer, opt, total_steps=1000)
    x1, x2 = torch.randn(7, inn, dtype=torch.float64), torch.randn(5, inn, dtype=torch.float64)
    before = layer.mask().clone()
    w, b = layer.dense_weight().requires_grad_(), layer.bias.detach()
    ((x1 @ w.t() + b).tanh().sum() + (x2 @ w.t() + b).square().sum()).backward()  # the reference's gradient
    (layer(x1).tanh().sum() + layer(x2).square().sum()).backward()
    opt.step()
    f = layer.policy.drop_fraction(1, 1000)
    expected = rigl_step(before, w.detach(), w.grad, f, spec)
    one_call = rigl_step(before, w.detach(), torch.autograd.grad((x1 @ w.t() + b).tanh().sum(), w)[0], f, spec)
    assert not torch.equal(expected, one_call)  # the case tells the whole gradient from the first call's
    updater.step()
    assert torch.equal(layer.mask(), expected)


@pytest.mark.parametrize("backend", ["cpu", "cpp"])
def test_choose_drops_takes_the_smallest_with_ties_low_and_leaves_its_scores_as_they_were(backend):
    # the 3 smallest of (0.5, -0, 0.2, 0, 0.2, 0.9): -0 and 0 tie at slots 1 and 3, then 0.2 at slot 2 (not 4)
    scores = torch.tensor([0.5, -0.0, 0.2, 0.0, 0.2, 0.9])
    before = scores.clone()
    with config.patch(backend=backend):
        assert choose_drops(scores, 3).tolist() == [1, 2, 3]
        with_nan = torch.tensor([0.5, float("nan"), 0.1, 0.3])  # the sort's path: NaN ranks last
        nan_before = with_nan.clone()
        assert choose_drops(with_nan, 2).tolist() == [2, 3]
    assert torch.equal(scores, before) and torch.equal(scores.signbit(), before.signbit())  # -0 stays -0
    assert torch.allclose(with_nan, nan_before, rtol=0, atol=0, equal_nan=True)  # NaN and all
