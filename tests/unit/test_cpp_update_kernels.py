"""The update step's generated C++ kernels against independent references on odd shapes: the fused grow
scan of a layer-wide unit (exact top-k of |dY^T X| with the tie rule, exclusions, too few eligible, a
sampled floor that must be abandoned, NaN), the drop selection, the plan kernel and the merge of
positions. Inputs are small integers, so every fp32 sum is exact whatever its order and ties are real."""

import dataclasses

import pytest
import torch

import sparsec
import sparsec.runtime.cpp as cpp
from sparsec import config
from sparsec.formats import make_layout
from sparsec.policies.decision import choose_drops, remap_positions, survivor_mask
from sparsec.runtime.cpp import CppPlan, cpp_grow_layer_wide, cpp_grow_per_unit, cpp_merge_kept
from sparsec.runtime.cpu import CSRPlan
from sparsec.runtime.grow import select_growth
from sparsec.runtime.selection import score_chunked


def _ints(*shape, gen, low=-3, high=4):
    return torch.randint(low, high, shape, generator=gen).float()


def _reference_top(dy, x, excluded, k):
    """The k best of |dy^T x| outside ``excluded`` by (score desc, flat asc): a full sort, in float64."""
    score = (dy.double().t() @ x.double()).abs().reshape(-1)
    eligible = torch.ones(score.numel(), dtype=torch.bool)
    eligible[excluded] = False
    flat = eligible.nonzero().view(-1)
    order = sorted(flat.tolist(), key=lambda f: (-score[f].item(), f))[:k]
    return torch.tensor(sorted(order), dtype=torch.int64), score


@pytest.mark.parametrize(
    "b,o,i,k,excluded_share",
    [(7, 37, 53, 40, 0.1), (3, 5, 3, 100, 0.2), (64, 13, 71, 1, 0.0), (5, 31, 33, 300, 0.5), (4, 6, 34, 0, 0.1)],
)
def test_the_fused_scan_takes_the_k_best_with_the_tie_rule(b, o, i, k, excluded_share):
    gen = torch.Generator().manual_seed(o * i)
    dy, x = _ints(b, o, gen=gen), _ints(b, i, gen=gen)
    x[:, 1] = 0  # a column of exact zeros: ties at the bottom
    excluded = torch.randperm(o * i, generator=gen)[: int(excluded_share * o * i)].sort().values
    flat, score, finite = cpp_grow_layer_wide(dy, x, excluded, k)
    want, ref = _reference_top(dy, x, excluded, k)
    assert finite and torch.equal(flat, want)  # fewer than k where fewer are eligible (3 x 5 x 3 = 15 < 100)
    assert torch.equal(score.double(), ref[flat])
    if k >= 40:  # the case really has ties at the boundary: the rule, not luck, decided who got in
        boundary = ref[want].min()
        assert int((ref == boundary).sum()) > int((ref[want] == boundary).sum())


@pytest.mark.parametrize("b,o,i,k", [(7, 37, 53, 40), (4, 1024, 600, 300)])  # the second: the floor's path
def test_listed_positions_flagged_as_dropped_are_eligible(b, o, i, k):
    gen = torch.Generator().manual_seed(o + i)
    dy, x = _ints(b, o, gen=gen), _ints(b, i, gen=gen)
    score = (dy.t() @ x).abs().reshape(-1)
    listed = score.argsort(descending=True, stable=True)[: 2 * k].sort().values  # the best positions are listed
    stays = torch.rand(listed.numel(), generator=gen) < 0.5  # half of them just dropped: eligible again
    flat, _, finite = cpp_grow_layer_wide(dy, x, listed, k, stays)
    want, _ = _reference_top(dy, x, listed[stays], k)
    assert finite and torch.equal(flat, want)
    assert bool(torch.isin(flat, listed[~stays]).any())  # the case really regrows just-dropped positions


def test_the_sampled_floor_is_abandoned_where_it_keeps_out_winners():
    gen = torch.Generator().manual_seed(0)
    b, o, i, k = 4, 1024, 600, 200  # 614k positions: past the sampling threshold
    dy, x = _ints(b, o, gen=gen), _ints(b, i, gen=gen)
    score = (dy.t() @ x).abs().reshape(-1)
    top = score.argsort(descending=True, stable=True)
    excluded = top[: 4 * k].sort().values  # every position the sample's floor admits is excluded
    flat, _, finite = cpp_grow_layer_wide(dy, x, excluded, k)
    rest = top[4 * k :]
    order = sorted(rest.tolist(), key=lambda f: (-score[f].item(), f))[:k]
    assert finite and flat.tolist() == sorted(order)
    flat, _, _ = cpp_grow_layer_wide(dy, x, torch.empty(0, dtype=torch.int64), k)  # the floor's own path
    assert flat.tolist() == sorted(top[:k].tolist())


def test_a_non_finite_score_is_reported():
    gen = torch.Generator().manual_seed(1)
    dy, x = _ints(5, 9, gen=gen), _ints(5, 11, gen=gen)
    x[2, 4] = float("nan")
    flat, _, finite = cpp_grow_layer_wide(dy, x, torch.empty(0, dtype=torch.int64), 10)
    assert not finite and 4 not in (flat % 11).tolist()  # the NaN column is never taken
    dy, x = _ints(4, 1024, gen=gen), _ints(4, 600, gen=gen)  # past the sampling threshold: the floor's path
    x[1, ::3] = float("nan")  # a third of the columns: the sample holds NaN scores
    flat, _, finite = cpp_grow_layer_wide(dy, x, torch.empty(0, dtype=torch.int64), 50)
    assert not finite and flat.numel() == 50 and bool(((flat % 600) % 3 != 0).all())


@pytest.mark.parametrize("regrow_dropped", [True, False])
def test_the_cpp_grow_step_chooses_what_the_chunked_selection_chooses(regrow_dropped):
    gen = torch.Generator().manual_seed(2)
    layout = make_layout(sparsec.parse_spec("80%"), 45, 67)
    kept = layout.random_positions(gen)
    dropped = choose_drops(torch.rand(kept.numel(), generator=gen), 150)
    dy, x = _ints(9, 45, gen=gen), _ints(9, 67, gen=gen)
    with config.patch(backend="cpp"):
        fused = select_growth(layout, kept, dropped, dy, x, regrow_dropped)
    with config.patch(backend="cpu"):
        chunked = score_chunked(layout, kept, dropped, dy, x, regrow_dropped)
    assert fused.finite and fused.complete
    assert torch.equal(fused.grown(), chunked.grown()) and fused.grown().numel() == 150
    rows = layout.format.compressed_rows(layout, layout.encode(kept))  # the layer's own rows, as rigl hands them
    with config.patch(backend="cpp"):
        assert torch.equal(select_growth(layout, kept, dropped, dy, x, regrow_dropped, rows).grown(), fused.grown())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(  # width: a unit's columns (the row's for fan-in; N:M groups: 4, 8, 2)
    "b,o,i,width,share",
    [
        (7, 37, 53, 53, 0.1),
        (3, 5, 3, 3, 0.2),
        (64, 13, 71, 71, 0.0),
        (5, 31, 33, 33, 0.5),
        (9, 6, 40, 40, 0.3),
        (7, 37, 52, 4, 0.3),
        (5, 9, 72, 8, 0.4),
        (64, 13, 34, 2, 0.2),
        (9, 6, 1030, 1030, 0.1),  # past a block of 1024 columns: each row's columns still reach it ascending
        (3, 7, 2100, 2100, 0.3),
        (3, 7, 2100, 4, 0.3),
    ],
)
def test_the_per_unit_scan_takes_each_unit_s_best_with_the_tie_rule(b, o, i, width, share, threads):
    """Each unit's need of |dy^T x| outside the listed positions, by (score desc, column asc), against a full
    sort in float64; integer scores (ties everywhere), needs from 0 to past a unit's eligible count."""
    gen = torch.Generator().manual_seed(o * i + threads)
    dy, x = _ints(b, o, gen=gen), _ints(b, i, gen=gen)
    x[:, 1] = 0  # a column of exact zeros: ties at the bottom
    listed = torch.randperm(o * i, generator=gen)[: int(share * o * i)].sort().values
    units = o * (i // width)
    need = torch.randint(0, width + 3, (units,), generator=gen)
    need[0], need[-1] = 0, width + 2  # a unit that grows nothing, and one asking past its eligible count
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flat, score, finite = cpp_grow_per_unit(dy, x, listed, need, width)
    finally:
        torch.set_num_threads(before)
    ref = (dy.double().t() @ x.double()).abs().reshape(-1)
    eligible = torch.ones(o * i, dtype=torch.bool)
    eligible[listed] = False
    want = []
    for u in range(units):  # unit u: positions u * width .. + width (row by row: units tile the rows)
        cols = [f for f in range(u * width, (u + 1) * width) if eligible[f]]
        want += sorted(sorted(cols, key=lambda f: (-ref[f].item(), f))[: int(need[u])])
    assert finite and flat.tolist() == want
    assert torch.equal(score.double(), ref[flat])
    assert bool((need > torch.bincount(flat // width, minlength=units)).any())  # some unit runs short


def test_the_per_unit_scan_counts_non_finite_scores_and_never_takes_them():
    gen = torch.Generator().manual_seed(3)
    dy, x = _ints(5, 9, gen=gen), _ints(5, 70, gen=gen)
    none = torch.empty(0, dtype=torch.int64)
    need = torch.full((9,), 5)
    need[3] = 0
    x[2, 4] = float("nan")  # column 4: NaN in every row
    flat, _, finite = cpp_grow_per_unit(dy, x, none, need, 70)
    assert not finite and flat.numel() == 40 and 4 not in (flat % 70).tolist()
    x[2, 4] = 1.0
    dy[:, 3] = float("inf")  # row 3 alone: inf or NaN everywhere, and it grows nothing: still counted
    flat, _, finite = cpp_grow_per_unit(dy, x, none, need, 70)
    assert not finite and 3 not in (flat // 70).tolist()
    dy[:, 3] = 1.0
    flat, _, finite = cpp_grow_per_unit(dy, x, none, need, 70)
    assert finite and flat.numel() == 40
    # finite inputs whose products overflow to +inf (no NaN anywhere), in a whole 6 x 32 register tile whose
    # rows all grow nothing: the tile's early-out must still let the inf through to be counted
    dy, x = torch.full((4, 6), 3e38), torch.ones(4, 32)
    flat, _, finite = cpp_grow_per_unit(dy, x, none, torch.zeros(6, dtype=torch.int64), 32)
    assert not finite and flat.numel() == 0


@pytest.mark.parametrize("need", [0, 1, 700, 2101])
def test_equal_scores_past_a_column_block_go_to_the_lowest_columns(need):
    dy, x = torch.ones(3, 5), torch.ones(3, 2100)  # every score 3: the tie rule alone decides
    flat, _, finite = cpp_grow_per_unit(dy, x, torch.empty(0, dtype=torch.int64), torch.full((5,), need), 2100)
    k = min(need, 2100)
    assert finite and flat.tolist() == [r * 2100 + c for r in range(5) for c in range(k)]


@pytest.mark.parametrize("regrow_dropped", [True, False])
@pytest.mark.parametrize(
    "spec,out,inn",
    [("fanin(90%)", 29, 301), ("fanin(k=5)", 13, 97), ("fanin(80%)", 64, 700), ("2:4", 29, 52), ("1:8", 13, 96)],
)
def test_the_cpp_grow_step_of_fan_in_rows_is_the_fused_scan_and_of_n_m_groups_chooses_what_torch_chooses(
    spec, out, inn, regrow_dropped, monkeypatch
):
    from sparsec.runtime import grow

    gen = torch.Generator().manual_seed(out)
    layout = make_layout(sparsec.parse_spec(spec), out, inn)
    kept = layout.random_positions(gen)
    dropped = choose_drops(torch.rand(kept.numel(), generator=gen), kept.numel() // 3)
    dy, x = _ints(9, out, gen=gen), _ints(9, inn, gen=gen)
    scans = []
    real = grow.cpp_grow_per_unit
    monkeypatch.setattr(grow, "cpp_grow_per_unit", lambda *a: scans.append(1) or real(*a))
    with config.patch(backend="cpp"):
        fused = select_growth(layout, kept, dropped, dy, x, regrow_dropped)
    with config.patch(backend="cpu"):
        chunked = score_chunked(layout, kept, dropped, dy, x, regrow_dropped)
    assert scans == ([1] if spec.startswith("fanin") else []) and fused.finite and fused.complete  # N:M: chunked
    assert torch.equal(fused.grown(), chunked.grown()) and fused.grown().numel() == dropped.numel()
    if regrow_dropped and spec != "fanin(k=5)":  # just-dropped positions compete, and some win (not at k=5)
        assert bool(torch.isin(fused.grown(), kept[dropped]).any())


@pytest.mark.parametrize("spec", ["fanin(80%)", "2:4", "1:8"])
@pytest.mark.parametrize("regrow_dropped", [True, False])
def test_short_units_grow_on_the_per_row_kernel_what_torch_s_selection_grows(spec, regrow_dropped):
    """Fan-in rows and N:M groups on the cpp backend: each chunk's regrowth from the generated per-row kernel
    equals the torch selection's (integer scores: ties everywhere), over several chunks of rows."""
    gen = torch.Generator().manual_seed(4)
    layout = make_layout(sparsec.parse_spec(spec), 40, 64)
    kept = layout.random_positions(gen)
    dropped = choose_drops(torch.rand(kept.numel(), generator=gen), kept.numel() // 3)
    dy, x = _ints(9, 40, gen=gen), _ints(9, 64, gen=gen)
    chosen = {}
    for backend in ("cpp", "cpu"):
        with config.patch(backend=backend, grow_chunk_bytes=9 * 64 * 4 * 8):  # 4 chunks of rows
            chosen[backend] = score_chunked(layout, kept, dropped, dy, x, regrow_dropped)
    assert chosen["cpp"].finite and chosen["cpp"].complete
    assert torch.equal(chosen["cpp"].grown(), chosen["cpu"].grown()) and chosen["cpp"].grown().numel() > 0
    assert torch.equal(torch.cat(chosen["cpp"]._score), torch.cat(chosen["cpu"]._score))


@pytest.mark.parametrize("backend", ["cpp", "cpu"])
def test_drops_are_the_smallest_with_ties_to_the_lower_slot(backend):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (1001,), generator=gen).float()  # hundreds of ties at every value
    with config.patch(backend=backend):
        got = choose_drops(scores, 333)
    want = sorted(range(1001), key=lambda s: (scores[s].item(), s))[:333]
    assert got.tolist() == sorted(want)
    scores[7] = float("nan")  # a score the selection cannot rank: the stable sort, NaN last
    with config.patch(backend=backend):
        assert choose_drops(scores, 1000).tolist() == [s for s in range(1001) if s != 7]


PLAN_CASES = [
    ("90%", 37, 53),
    ("2:4", 12, 16),
    ("fanin(75%)", 9, 40),
    ("99%", 70000, 30),
    ("99%", 20, 70000),
    ("90%", 701, 997),  # 70k entries: the counting sort splits over two threads
    ("fanin(90%)", 800, 1000),
]


def _assert_same_plan(fast: CppPlan, slow: CppPlan) -> None:
    """The generated kernels' plan, W^T built from its rows, is torch's."""
    fast.transposed()
    for field in dataclasses.fields(CppPlan):
        a, b = getattr(fast, field.name), getattr(slow, field.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), field.name
        else:
            assert a == b, field.name


@pytest.mark.parametrize("spec,out,inn", PLAN_CASES)
@pytest.mark.parametrize("bucketed", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_plan_kernel_builds_the_plan_torch_builds(spec, out, inn, bucketed, threads, monkeypatch):
    if bucketed:  # the wide layers' path, on every case: chunks of 64 entries through 256 column buckets
        monkeypatch.setattr(cpp, "PLAN_DIRECT_BYTES", 0)
        monkeypatch.setattr(cpp, "PLAN_CHUNK", 64)
    layout = make_layout(sparsec.parse_spec(spec), out, inn)
    flat = layout.random_positions(torch.Generator().manual_seed(4))
    slow = CppPlan.build(CSRPlan.build(layout, flat), layout, flat)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_same_plan(CppPlan.of_weights(flat, (out, inn)), slow)
        rows = layout.format.compressed_rows(layout, layout.encode(flat))
        if rows is not None:  # csr and fan-in: from the buffers themselves
            _assert_same_plan(CppPlan.of_rows(*rows, (out, inn)), slow)
    finally:
        torch.set_num_threads(before)
    assert slow.cols.dtype == (torch.int32 if inn > 65536 else torch.uint16)  # past 16-bit columns


def test_a_plan_rebuilt_in_place_keeps_its_tensors_and_holds_the_new_mask():
    layout = make_layout(sparsec.parse_spec("90%"), 701, 997)
    first, second = (layout.random_positions(torch.Generator().manual_seed(s)) for s in (1, 2))
    plan = CppPlan.of_rows(*layout.format.compressed_rows(layout, layout.encode(first)), (701, 997))
    assert plan.offsets_t is None and plan.cols_t is None and plan.order_t is None  # W^T: built at first use
    plan.transposed()
    _assert_same_plan(plan, CppPlan.build(CSRPlan.build(layout, first), layout, first))
    held = {f.name: getattr(plan, f.name) for f in dataclasses.fields(CppPlan) if f.name != "stale_t"}
    again = CppPlan.of_rows(*layout.format.compressed_rows(layout, layout.encode(second)), (701, 997), into=plan)
    assert again is plan and all(getattr(again, k) is v for k, v in held.items())
    assert again.stale_t  # W^T holds the first mask until its next use rebuilds it, into the same tensors
    _assert_same_plan(again, CppPlan.build(CSRPlan.build(layout, second), layout, second))
    assert all(getattr(again, k) is v for k, v in held.items()) and not again.stale_t


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_the_merge_keeps_the_slots_of_positions_present_before(dtype):
    gen = torch.Generator().manual_seed(5)
    kept = torch.randperm(500, generator=gen)[:120].sort().values.to(dtype)
    dropped = torch.randperm(120, generator=gen)[:30].sort().values
    survives = survivor_mask(kept, dropped)
    fresh = torch.tensor(sorted(set(range(500)) - set(kept.tolist())))[:20]
    grown = torch.cat([fresh, kept[dropped[:10]]]).sort().values  # ten just-dropped positions regrown
    with config.patch(backend="cpu"):
        want = remap_positions(kept, survives, grown)
    got = cpp_merge_kept(kept, survives, grown.long())
    assert got[0].dtype == dtype  # int32 positions stay int32 (half the bytes of an update's largest array)
    assert torch.equal(got[0].long(), want[0].long()) and torch.equal(got[1].long(), want[1].long())
    assert int((got[1] >= 0).sum()) == 90 + 10  # survivors and regrown keep slots; 20 fresh get -1


@pytest.mark.parametrize("spec", ["97%", "fanin(k=5)"])
def test_an_update_holds_int32_positions_where_the_format_has_rows_and_they_fit(spec):
    layer = sparsec.SparseLinear(301, 203, spec=spec, policy=sparsec.rigl(delta_t=1))
    updater = sparsec.MaskUpdater(layer, torch.optim.SGD(layer.parameters(), lr=0.1), total_steps=100)
    armed = layer.grow_capture  # armed by the updater for step 1: its positions are the update's
    assert armed.kept.dtype == torch.int32 and torch.equal(armed.kept.long(), layer.positions())
    before = layer.positions().clone()
    layer(torch.randn(7, 301)).square().sum().backward()
    assert updater.step()[""] > 0  # the int32 positions went through the grow step, the merge and the encode
    layer.layout.check_positions(layer.positions())
    assert not torch.equal(layer.positions(), before)
    with config.patch(backend="cpu"):  # another backend, or a format without compressed rows: int64
        assert layer.update_positions().dtype == torch.int64
    assert sparsec.SparseLinear(16, 8, spec="2:4").update_positions().dtype == torch.int64


def test_positions_past_int32_are_never_narrowed():
    layout = make_layout(sparsec.parse_spec("99.99%"), 65536, 32768)  # 2^31 positions: the last is 2^31 - 1
    rows = {"row_offsets": torch.zeros(65537, dtype=torch.int32), "col_indices": torch.zeros(0, dtype=torch.int32)}
    assert layout.decode_int32(rows) is None
    small = make_layout(sparsec.parse_spec("90%"), 37, 41)
    flat = small.random_positions(torch.Generator().manual_seed(3))
    narrow = small.decode_int32(small.encode(flat))
    assert narrow.dtype == torch.int32 and torch.equal(narrow.long(), flat)
    for a, b in zip(small.encode(flat).values(), small.encode(narrow).values(), strict=True):  # int32 encodes alike
        assert torch.equal(a, b)


def test_a_short_unit_on_cpp_grows_what_the_reference_grows():
    # 10% sparsity, a third of the kept dropped, fresh first: fewer fresh positions than the unit lost,
    # so it regrows its best just-dropped positions too (the chunked path: the fused scan declines)
    gen = torch.Generator().manual_seed(6)
    layout = make_layout(sparsec.parse_spec("10%"), 13, 17)
    kept = layout.random_positions(gen)
    dropped = choose_drops(torch.rand(kept.numel(), generator=gen), kept.numel() // 3)
    dy, x = _ints(5, 13, gen=gen), _ints(5, 17, gen=gen)
    with config.patch(backend="cpp"):
        got = select_growth(layout, kept, dropped, dy, x, regrow_dropped=False)
    assert got.any_short
    score = (dy.double().t() @ x.double()).abs().reshape(-1)
    fresh = sorted(set(range(13 * 17)) - set(kept.tolist()))  # all of them, then the best just-dropped
    just_dropped = sorted(kept[dropped].tolist(), key=lambda f: (-score[f].item(), f))
    want = sorted(fresh + just_dropped[: dropped.numel() - len(fresh)])
    assert got.grown().tolist() == want
