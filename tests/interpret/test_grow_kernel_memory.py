"""The grow kernel path keeps the dense gradient's promise (issue 10): its working memory follows the chunk
budget whatever the layer size, and it runs the |dY^T X| product once (twice, partly, for a layer-wide unit).

Memory is measured as tests/unit/test_grow_memory.py measures the CPU path: the peak of live tensor bytes
while the grow selection runs, on a layer whose candidate keys at one chunk would be several times the
budget. The bookkeeping every grow step has whatever its chunks (the selector's per-unit counts, the drop
flags, the grown positions) is measured on its own and allowed on top.
"""

import pytest
import torch
from helpers import peak_allocated_bytes

import sparsec
from sparsec import config
from sparsec.dtypes import name_of
from sparsec.formats import make_layout
from sparsec.policies.decision import choose_drops
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.grow import KEY_BYTES, grow_on_kernels
from sparsec.runtime.launch import Launcher
from sparsec.runtime.selection import GrowSelector, score_chunked

OUT, IN, BATCH = 256, 256, 32  # 8 row tiles of 32 (fp32) x 8 column tiles: small for the interpreter
BUDGET = 8 * 1024  # below one row tile of keys: a chunk is one row tile


def _case(spec: str, drop_fraction: float, hot_row: bool = False):
    gen = torch.Generator().manual_seed(5)
    layout = make_layout(sparsec.parse_spec(spec), OUT, IN)
    launcher = Launcher(compile_layer(str(layout.spec), IN, OUT, name_of(torch.float32), False, None), layout, True)
    kept = layout.random_positions(gen)
    plan = launcher.plan(layout.encode(kept))
    dropped = choose_drops(torch.rand(kept.numel(), generator=gen), int(kept.numel() * drop_fraction))
    dy, x = torch.randn(BATCH, OUT, generator=gen), torch.randn(BATCH, IN, generator=gen)
    if hot_row:  # a few output rows carry most of the gradient: their segments hide more winners
        dy[:, 3:6] *= 30
    return launcher, layout, plan, kept, dropped, dy, x  # grow_on_kernels' arguments


def _grow_peak(case, budget: int, monkeypatch) -> tuple[int, torch.Tensor, list[int]]:
    """Peak bytes of one grow selection, its grown positions, and the bytes of every grow_scores output."""
    launcher, layout, plan, kept, dropped, dy, x = case
    found, outputs = {}, []
    original = Launcher.run

    def record(self, program, plan, **operands):
        out = original(self, program, plan, **operands)
        outputs.append(out.numel() * out.element_size())
        return out

    def grow():
        found["grown"] = grow_on_kernels(launcher, layout, plan, kept, dropped, dy, x).grown()

    with monkeypatch.context() as patch, config.patch(grow_chunk_bytes=budget):
        patch.setattr(Launcher, "run", record)
        peak = peak_allocated_bytes(grow)
    return peak, found["grown"], outputs


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["90%", "fanin(k=32)", "1:8"])
def test_grow_kernel_memory_follows_the_chunk_budget(spec, monkeypatch):
    case = _case(spec, 0.05)
    _, layout, _, kept, dropped, dy, x = case
    layer_wide = layout.unit_size > IN
    bookkeeping = peak_allocated_bytes(lambda: GrowSelector(layout, kept, dropped).fresh_need.sum())
    # what every grow step holds whatever its chunks: drop flags, and the grown positions with their
    # scores, sorted and concatenated (a layer-wide unit's running best: twice that many, flagged)
    held = layout.n_items + dropped.numel() * ((8 + 4 + 1) * 2 * 3 if layer_wide else (8 + 4) * 3)
    chunked, grown, outputs = _grow_peak(case, BUDGET, monkeypatch)
    assert torch.equal(grown, score_chunked(layout, kept, dropped, dy, x, False).grown())
    keys = sum(outputs)  # every key the kernel wrote, over all chunks
    assert len(outputs) >= 4 and keys >= 4 * max(outputs)  # the case really runs in chunks
    # the budget, or one row tile's keys and the host's work on them
    chunk = max(BUDGET, max(outputs) * KEY_BYTES["layer" if layer_wide else "rows"] // 8)
    assert chunked - bookkeeping - held <= 2 * chunk, (chunked, bookkeeping, held, keys, chunk)
    if spec != "1:8":  # guard (where keys outweigh the per-group bookkeeping): one chunk holds every key
        whole, _, whole_outputs = _grow_peak(case, 1 << 40, monkeypatch)
        assert max(whole_outputs) >= 4 * max(outputs)  # the first run in one launch
        assert whole - chunked >= keys / 2, (whole, chunked, keys)


@pytest.mark.slow
def test_layer_wide_growth_runs_the_product_twice_at_most_and_the_second_time_on_few_tiles(monkeypatch):
    """Where a few rows carry the gradient, their tiles are scored again; nothing else is."""
    runs = []
    original = Launcher.run

    def record(self, program, plan, **operands):
        if program == "grow_scores":
            tiles = operands.get("tiles")
            runs.append((operands.get("r0"), operands.get("r1"), None if tiles is None else tiles.shape[0]))
        return original(self, program, plan, **operands)

    monkeypatch.setattr(Launcher, "run", record)
    case = _case("90%", 0.3, hot_row=True)
    _, layout, _, kept, dropped, dy, x = case
    with config.patch(grow_chunk_bytes=BUDGET):
        grown = grow_on_kernels(*case).grown()
    assert torch.equal(grown, score_chunked(layout, kept, dropped, dy, x, False).grown())
    first = [r for r in runs if r[2] is None]
    second = [r for r in runs if r[2] is not None]
    assert len(first) > 1 and [r0 for r0, _, _ in first] == sorted({r0 for r0, _, _ in first})  # chunks, once each
    assert sum(r1 - r0 for r0, r1, _ in first) == OUT  # every row scored once in the first run
    all_tiles = -(-OUT // 32) * (IN // 32)
    listed = sum(n for _, _, n in second)
    assert 0 < listed < all_tiles / 2, (listed, all_tiles)  # the hot rows' tiles, not the layer


@pytest.mark.parametrize("spec", [pytest.param("fanin(k=64)", marks=pytest.mark.slow), "2:4"])
def test_units_of_a_row_or_less_grow_in_one_run(spec, monkeypatch):
    runs = []
    original = Launcher.run
    monkeypatch.setattr(
        Launcher,
        "run",
        lambda self, p, plan, **k: runs.append((p, k.get("r0"), k.get("tiles"))) or original(self, p, plan, **k),
    )
    case = _case(spec, 1.0)  # every unit regrows all it lost: the old doubling re-ran the product
    _, layout, _, kept, dropped, dy, x = case
    grown = grow_on_kernels(*case).grown()
    assert torch.equal(grown, score_chunked(layout, kept, dropped, dy, x, False).grown())
    assert [(p, r0, t) for p, r0, t in runs] == [("grow_scores", 0, None)]
