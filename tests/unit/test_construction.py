"""A sparse layer is born in O(kept): its random topology drawn without a tensor of every position (every
path of ``formats.sampling``: exact counts, uniform subsets), and a model built on the meta device is
sparsified, materialised by ``to_empty`` + ``reset_parameters`` and trained, for every structure."""

import collections
import itertools

import pytest
import torch
from helpers import largest_allocation_bytes
from torch import nn

import sparsec
import sparsec.formats.sampling as sampling
from sparsec.formats.sampling import random_subsets

PATHS = {  # (units, size, k, _CHUNK and _PIECE): the path each case takes
    "table (2:4 groups)": (6, 4, 2, 1 << 18),
    "draws": (5, 300, 7, 1 << 18),
    "complement (most of a unit)": (4, 300, 290, 1 << 18),
    "units a chunk at a time": (50, 200, 5, 64),
    "one unit in pieces": (1, 20000, 700, 64),
}


@pytest.mark.parametrize("units,size,k,chunk", PATHS.values(), ids=PATHS.keys())
def test_every_unit_keeps_exactly_k_distinct_positions_of_its_own(units, size, k, chunk, monkeypatch):
    monkeypatch.setattr(sampling, "_CHUNK", chunk)
    monkeypatch.setattr(sampling, "_PIECE", chunk)
    flat = random_subsets(units, size, k, torch.Generator().manual_seed(1))
    assert flat.dtype == torch.int64 and flat.numel() == units * k
    assert bool((flat[1:] > flat[:-1]).all())  # sorted and distinct
    assert 0 <= int(flat[0]) and int(flat[-1]) < units * size
    assert torch.bincount(flat // size, minlength=units).tolist() == [k] * units


def test_the_paths_are_the_ones_named(monkeypatch):
    taken = []
    for name in ("_one_large_unit", "_draws", "_subsets_at_most"):
        real = getattr(sampling, name)
        monkeypatch.setattr(sampling, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    monkeypatch.setattr(sampling, "_PIECE", 64)
    random_subsets(1, 20000, 700)
    assert "_one_large_unit" in taken
    taken.clear()
    random_subsets(6, 4, 2)
    assert taken == ["_subsets_at_most"]  # a row of the table, no draws


def test_the_table_of_a_unit_holds_its_subsets_not_every_tuple():
    # 7 of 14 positions: 3432 subsets, at most _TABLE, so a row of their table (torch.combinations built all
    # 14**7 tuples for it first: gigabytes and 9 s)
    assert sampling._subsets_at_most(14, 7, sampling._TABLE)
    biggest = largest_allocation_bytes(lambda: random_subsets(3, 14, 7, torch.Generator().manual_seed(0)))
    assert biggest <= 3432 * 7 * 8, f"a {biggest}-byte tensor; the table is {3432 * 7 * 8}"


def _chi_square(counts: collections.Counter, outcomes: list, trials: int) -> float:
    expected = trials / len(outcomes)
    return sum((counts[o] - expected) ** 2 / expected for o in outcomes)


@pytest.mark.parametrize(
    "units,size,k,chunk,table",
    [
        (1, 5, 2, 1 << 18, 4096),  # the table
        (1, 5, 2, 1 << 18, 0),  # draws, de-duplicated and thinned
        (1, 6, 4, 1 << 18, 0),  # the complement of draws
        (1, 6, 2, 1, 0),  # one unit in pieces: multinomial draws, hypergeometric thinning
        (2, 3, 1, 1, 0),  # units one at a time
    ],
)
def test_every_subset_is_equally_likely(units, size, k, chunk, table, monkeypatch):
    monkeypatch.setattr(sampling, "_CHUNK", chunk)
    monkeypatch.setattr(sampling, "_PIECE", chunk)
    monkeypatch.setattr(sampling, "_TABLE", table)
    gen = torch.Generator().manual_seed(3)
    trials = 6000
    counts = collections.Counter(tuple(random_subsets(units, size, k, gen).tolist()) for _ in range(trials))
    per_unit = [tuple(c) for c in itertools.combinations(range(size), k)]
    outcomes = [
        sum((tuple(u * size + i for i in c) for u, c in enumerate(cs)), ())
        for cs in itertools.product(per_unit, repeat=units)
    ]
    assert set(counts) <= set(outcomes)
    # chi-square with len(outcomes) - 1 degrees of freedom (9, 14 or 8): 40 is beyond p = 1e-5 for each
    assert _chi_square(counts, outcomes, trials) < 40


SPARSE_SPECS = ["99%", "fanin(99%)", "block(8x8, 99%)", "1:16"]


@pytest.mark.parametrize("spec", SPARSE_SPECS)
def test_building_a_layer_never_allocates_a_tensor_of_every_position(spec):
    out = inn = 1024
    biggest = largest_allocation_bytes(lambda: sparsec.SparseLinear(inn, out, spec=spec))
    assert biggest < out * inn, f"{spec}: a {biggest}-byte tensor (a bool mask is {out * inn})"


def test_the_probe_sees_a_tensor_of_every_position():
    assert largest_allocation_bytes(lambda: torch.randperm(1024 * 1024)) >= 1024 * 1024


def test_values_follow_the_dense_layers_distribution():
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(4096, 256, spec="99%")
    bound = 1 / 4096**0.5  # nn.Linear's kaiming-uniform bound for the dense fan-in
    v = layer.values.detach()
    assert float(v.abs().max()) <= bound and float(v.abs().max()) > 0.99 * bound
    assert float(v.var()) == pytest.approx(bound**2 / 3, rel=0.05)  # uniform(-b, b): variance b^2 / 3


ALL_SPECS = ["90%", "2:4", "block(4x4, 75%)", "fanin(75%)"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_a_model_built_on_meta_is_sparsified_materialised_and_trained(spec):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Net()
    sparsec.sparsify(model, spec=spec, policy=sparsec.rigl(delta_t=2), dense=["head"])
    assert model.fc1.values.is_meta and isinstance(model.head, nn.Linear)
    model.to_empty(device="cpu")
    with pytest.raises(sparsec.SparsecError, match="reset_parameters"):
        model(torch.randn(2, 4, 4, 4))  # to_empty leaves memory unset: never a forward on garbage indices
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for layer in (model.conv, model.fc1, model.fc2):
        layer.layout.check_positions(layer.positions())
        assert torch.isfinite(layer.values).all()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    x, y = torch.randn(16, 4, 4, 4), torch.randint(0, 4, (16,))
    losses, dropped = [], 0
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        updater.step()
        dropped += sum(updater.last_dropped.values())
        opt.zero_grad()
        losses.append(loss.item())
    assert dropped > 0 and losses[-1] < losses[0]
    for layer in (model.conv, model.fc1, model.fc2):
        layer.layout.check_positions(layer.positions())


def test_a_checkpoint_loaded_after_to_empty_materialises_the_layer():
    torch.manual_seed(0)
    trained = sparsec.SparseLinear(40, 24, spec="90%")
    with torch.device("meta"):
        fresh = sparsec.SparseLinear(40, 24, spec="90%")
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(3, 40)
    assert torch.equal(fresh(x), trained(x))
