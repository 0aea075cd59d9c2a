"""The autotuner driven end to end with an injected timer and fake devices: buckets, keys, the persistent
cache (invalidation, corruption, foreign files, concurrent writers), pruning, ranking, the correctness gate
and the lookup chain the ops make."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import warnings

import pytest
import torch

import sparsec
from sparsec import config
from sparsec.errors import SparsecError
from sparsec.passes.cost import GPUS, roofline
from sparsec.runtime import ops, tuner
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.cpp import CppPlan, cpp_densify, cpp_sample
from sparsec.runtime.devices import Device, cpu_device
from sparsec.runtime.plans import held_plan
from sparsec.runtime.strategies import STRATEGIES, Strategy
from sparsec.runtime.tunecache import TuneCache, TuneKey, TuningWarning, batch_bucket, density_bucket
from sparsec.tuning import summary

FAKE = Device("cpu", "Fake CPU 9000", "avx2+fma", 2, (("cxx", "g++ 12"), ("torch", "2.13.0")))
KEY = TuneKey("forward", "unstructured", "2^-3.5", "fp32", 64, 96, 16, "abc123")


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    tuner.forget_choices()
    tuner._warned.clear()
    yield
    tuner.forget_choices()


def test_buckets_by_hand():
    assert [batch_bucket(b) for b in (0, 1, 2, 3, 4, 5, 255, 256, 257)] == [1, 1, 2, 4, 4, 8, 256, 256, 512]
    assert density_bucket(0.1) == "2^-3.5"  # log2(0.1) = -3.32: the nearest half octave is -3.5
    assert density_bucket(0.5) == "2^-1" and density_bucket(1.0) == "2^0" and density_bucket(0.01) == "2^-6.5"
    assert density_bucket(0.0) == "empty"


def test_a_key_round_trips_through_its_text():
    assert TuneKey.parse(KEY.text()) == KEY


def test_store_get_and_the_nearest_batch_bucket():
    cache = TuneCache(FAKE)
    cache.store(KEY, {"strategy": "dense"})
    far = dataclasses.replace(KEY, batch=256)
    cache.store(far, {"strategy": "cpp"})
    assert cache.get(KEY) == {"strategy": "dense"}
    assert cache.nearest(dataclasses.replace(KEY, batch=32)) == {"strategy": "dense"}  # 16 is nearer than 256
    assert cache.nearest(dataclasses.replace(KEY, batch=128)) == {"strategy": "cpp"}
    assert json.loads(cache.path.read_text())["device"] == FAKE.identity()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TuneKey)])
def test_each_key_field_invalidates_an_entry(field):
    cache = TuneCache(FAKE)
    cache.store(KEY, {"strategy": "dense"})
    value = getattr(KEY, field)
    other = dataclasses.replace(KEY, **{field: value * 2 if isinstance(value, int) else value + "x"})
    assert cache.get(other) is None
    if field != "batch":  # another batch bucket is what `nearest` serves; every other field must match
        assert cache.nearest(other) is None


@pytest.mark.parametrize(
    "change", ["name", "arch", "units", "torch", "cxx"]
)  # every part of the device and toolchain identity
def test_another_device_or_toolchain_never_reads_the_entry(change):
    TuneCache(FAKE).store(KEY, {"strategy": "dense"})
    tools = dict(FAKE.toolchain)
    if change in tools:
        tools[change] += "-other"
        other = dataclasses.replace(FAKE, toolchain=tuple(sorted(tools.items())))
    else:
        value = getattr(FAKE, change)
        other = dataclasses.replace(FAKE, **{change: value + 1 if isinstance(value, int) else value + " v2"})
    assert TuneCache(other).path != TuneCache(FAKE).path
    assert TuneCache(other).get(KEY) is None


@pytest.mark.parametrize(
    "content",
    ['{"schema": 1, "device": ', "not json", '{"schema": 99, "entries": {}}', "[1, 2]"],
    ids=["truncated", "corrupt", "foreign schema", "not a table"],
)
def test_an_unusable_file_is_ignored_with_one_warning_and_rewritten(content):
    cache = TuneCache(FAKE)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text(content)
    with pytest.warns(TuningWarning, match="is ignored"):
        assert cache.get(KEY) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get(KEY) is None  # one warning per problem, not one per lookup
    cache.store(KEY, {"strategy": "cpp"})
    assert TuneCache(FAKE).get(KEY) == {"strategy": "cpp"}


def test_a_file_of_another_device_under_this_name_is_ignored():
    cache = TuneCache(FAKE)
    cache.path.parent.mkdir(parents=True)
    foreign = dataclasses.replace(FAKE, name="Another CPU")
    cache.path.write_text(json.dumps({"schema": 1, "device": foreign.identity(), "entries": {KEY.text(): {}}}))
    with pytest.warns(TuningWarning, match="not this device"):
        assert cache.get(KEY) is None


def test_export_and_import_move_entries_and_refuse_foreign_ones(tmp_path):
    TuneCache(FAKE).store(KEY, {"strategy": "dense"})
    assert TuneCache(FAKE).export(tmp_path / "out.json") == 1
    target = TuneCache(FAKE, root=tmp_path / "other")
    assert target.import_(tmp_path / "out.json") == 1 and target.get(KEY) == {"strategy": "dense"}
    with pytest.raises(SparsecError, match="not this device"):
        TuneCache(dataclasses.replace(FAKE, units=64), root=tmp_path / "third").import_(tmp_path / "out.json")


def _write_many(root: str, worker: int, start) -> None:
    cache = TuneCache(FAKE, root=root)
    start.wait()  # both processes are up (imports done): their stores overlap
    for i in range(40):
        cache.store(dataclasses.replace(KEY, out_features=1000 * worker + i), {"strategy": "cpp", "i": i})


def test_two_processes_writing_at_once_leave_one_valid_file_holding_both(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    workers = [ctx.Process(target=_write_many, args=(str(tmp_path), w, start)) for w in (1, 2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    entries = TuneCache(FAKE, root=tmp_path).entries()
    assert len(entries) == 80
    assert {TuneKey.parse(k).out_features // 1000 for k in entries} == {1, 2}


# --- the tuner ---------------------------------------------------------------------------------------


def _layer(spec="75%", out=24, inn=40):
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(inn, out, bias=False, spec=spec, policy=sparsec.static)
    index = list(layer.index_buffers().values())
    return layer, ops._key(layer.values, *layer.layout.op_key), index


class WrongFast(Strategy):
    """Fast and wrong: the correctness gate must never choose it."""

    def plan_kind(self, backend):
        return "cpu"

    def forward(self, key, backend, plan, x, values, bias):
        return STRATEGIES["torch-csr"].forward(key, backend, plan, x, values, bias) * 1.01


class NeverRuns(Strategy):
    def problem(self, device_type):
        return "needs a device this machine lacks"

    def forward(self, *args):
        raise AssertionError("a pruned candidate ran")


def _timer(seconds: dict[str, float], calls: list[str]):
    """An injected timer: a fixed time per strategy; each timed function runs once (and is recorded)."""

    def timer(fn):
        fn()
        name = fn.__defaults__[0].name
        calls.append(name)
        return seconds[name]

    return timer


def _tune(program, layer, key, index, batch, seconds, calls, **options):
    """tune_program on the fake device with the injected timer and a cache of its own."""
    options.setdefault("cache", TuneCache(FAKE))
    return tuner.tune_program(
        program, key, index, layer.values, batch, backend="cpp", timer=_timer(seconds, calls), device=FAKE, **options
    )


def test_the_gate_rejects_a_wrong_but_fast_candidate_and_pruned_ones_never_run():
    layer, key, index = _layer()
    calls = []
    seconds = {"wrong-fast": 1e-6, "torch-csr": 3e-3, "dense": 2e-3}
    candidates = [
        WrongFast("wrong-fast", ("cpu",)),
        STRATEGIES["torch-csr"],
        STRATEGIES["dense"],
        NeverRuns("never", ("cpu",)),
    ]
    cache = TuneCache(FAKE)
    result = _tune("forward", layer, key, index, 7, seconds, calls, candidates=candidates, cache=cache)
    status = {o.strategy: o.status for o in result.outcomes}
    assert status == {"wrong-fast": "wrong", "never": "pruned", "torch-csr": "timed", "dense": "chosen"}
    assert result.chosen == "dense" and result.dense_seconds == 2e-3 and sorted(calls) == ["dense", "torch-csr"]
    entry = cache.get(result.key)
    assert entry["strategy"] == "dense" and entry["rejected"]["wrong-fast"] == "differs from the float64 product"
    assert result.key.batch == 8 and result.key.program == "forward" and result.key.out_features == 24


@pytest.mark.parametrize("program", ["forward", "grad_input", "grad_values"])
@pytest.mark.parametrize(
    "spec, dtype",
    [
        ("2:4", torch.float32),
        ("75%", torch.bfloat16),
        ("block(4x4, 50%)", torch.float32),
        ("fanin(50%)", torch.float16),
    ],
)
def test_every_real_cpu_strategy_passes_the_gate_on_each_program(program, spec, dtype):
    # block layouts store values out of row order (the cpp plan's order): dense's decompress and sampling
    # read through it; the gate compares each with the float64 product of layout.to_dense
    layer, key, index = _layer(spec, 16, 32)
    layer.to(dtype)
    key = ops._key(layer.values, *layer.layout.op_key)
    calls = []
    seconds = {"cpp": 1.0, "cpp-rows": 1.5, "torch-csr": 2.0, "dense": 3.0, "cpp-scatter": 1.2, "cpp-transposed": 1.3}
    result = _tune(program, layer, key, index, 5, seconds, calls)
    block = spec.startswith("block")
    rows = "timed" if block else "pruned"  # rows of a block layer; elsewhere cpp itself
    walks = "timed" if program == "grad_input" and not block else "pruned"  # grad_input of single weights only
    want = {"cpp": "chosen", "cpp-rows": rows, "torch-csr": "timed", "dense": "timed"}
    want |= {"cpp-scatter": walks, "cpp-transposed": walks}
    assert {o.strategy: o.status for o in result.outcomes} == want


@pytest.mark.parametrize("spec", ["75%", "fanin(50%)"])
def test_cpp_scatter_and_cpp_transposed_walk_w_rows_and_w_t_rows_through_the_gate(spec, monkeypatch):
    import sparsec.runtime.cpp as cpp

    layer, key, index = _layer(spec, 48, 40)  # batch 64: tiles, where the two walks are different kernels
    walked = []
    scatter, transposed = cpp._scatter_tiles_product, cpp.CppPlan.transposed
    monkeypatch.setattr(cpp, "_scatter_tiles_product", lambda *a: walked.append("rows") or scatter(*a))
    monkeypatch.setattr(cpp.CppPlan, "transposed", lambda plan: walked.append("columns") or transposed(plan))
    for name, walk in (("cpp-scatter", "rows"), ("cpp-transposed", "columns")):
        calls = []
        result = _tune("grad_input", layer, key, index, 64, {name: 1.0}, calls, candidates=[STRATEGIES[name]])
        assert result.chosen == name and set(walked) == {walk}  # through the float64 gate, on its own walk
        walked.clear()


@pytest.mark.parametrize("program", ["forward", "grad_input", "grad_values"])
def test_cpp_rows_runs_a_block_layer_on_its_rows_not_its_micro_tiles(program, monkeypatch):
    import sparsec.runtime.cpp as cpp

    layer, key, index = _layer("block(4x4, 50%)", 16, 32)
    micro = []
    real = cpp._block_kernels
    monkeypatch.setattr(cpp, "_block_kernels", lambda plan, src, tiles: micro.append(tiles) or real(plan, src, tiles))
    used = []
    for name in ("cpp", "cpp-rows"):
        calls = []
        result = _tune(program, layer, key, index, 64, {name: 1.0}, calls, candidates=[STRATEGIES[name]])
        assert result.chosen == name  # through the float64 gate
        used.append(set(micro))
        micro.clear()
    assert used == [{True}, {False}]
    assert real(ops.index_plan(key, "cpp", index), torch.zeros(64, 32), True) is not None  # cpp really has tiles here


def test_the_dense_strategy_decompresses_and_samples_through_the_value_order_by_hand():
    # two rows of W (2 x 3): row 0 keeps columns 0 and 2, row 1 keeps column 1; entry e's value is stored
    # at slot order[e] = (2, 0, 1), so the values (10, 20, 30) put 30 at (0, 0), 10 at (0, 2), 20 at (1, 1)
    offsets = torch.tensor([0, 2, 3])
    cols = torch.tensor([0, 2, 1], dtype=torch.int32)
    order = torch.tensor([2, 0, 1], dtype=torch.int32)
    plan = CppPlan(offsets, cols, order, offsets, cols, order, (2, 3))
    values = torch.tensor([10.0, 20.0, 30.0])
    want = torch.tensor([[30.0, 0.0, 10.0], [0.0, 20.0, 0.0]])
    torch.testing.assert_close(cpp_densify(plan, values, torch.float32), want)
    reused = torch.full((2, 3), 7.0)
    assert cpp_densify(plan, values, torch.float32, reused) is reused and torch.equal(reused, want)
    torch.testing.assert_close(cpp_densify(plan, values, torch.bfloat16), want.bfloat16())
    dense = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    torch.testing.assert_close(cpp_sample(plan, dense, values), torch.tensor([3.0, 5.0, 1.0]))


def test_ranking_times_only_the_top_candidates():
    layer, key, index = _layer("99%", 64, 256)  # sparse: dense moves the most bytes, cpp the fewest
    calls = []
    result = _tune("forward", layer, key, index, 4, {"cpp": 2.0, "torch-csr": 1.0, "dense": 0.5}, calls, top=2)
    assert sorted(calls) == ["cpp", "torch-csr"] and result.chosen == "torch-csr"
    assert {o.strategy: o.status for o in result.outcomes}["dense"] == "not timed"


# --- the lookup the ops make -----------------------------------------------------------------------------


def test_the_lookup_chain_exact_then_nearest_then_default_with_one_warning():
    layer, key, index = _layer()
    v = layer.values
    assert tuner.explain_choice("forward", key, "cpp", v, 3) == ("cpp", "default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cache file for this device: nobody tuned, nobody is warned
        assert tuner.choose("forward", key, "cpp", v, 3).name == "cpp"
    cache = TuneCache(cpu_device())
    cache.store(tuner.tune_key("forward", key, v.dtype, 3, "cpp"), {"strategy": "dense"})
    tuner.forget_choices()
    assert tuner.explain_choice("forward", key, "cpp", v, 3) == ("dense", "exact entry")
    assert tuner.explain_choice("forward", key, "cpp", v, 64) == ("dense", "nearest batch bucket")
    with pytest.warns(TuningWarning, match="no tuning entry for grad_input"):
        assert tuner.choose("grad_input", key, "cpp", v, 3).name == "cpp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuner.forget_choices()
        assert tuner.choose("grad_input", key, "cpp", v, 3).name == "cpp"  # one warning per kernel


def test_a_stored_choice_runs_in_the_layer_and_computes_the_product(monkeypatch):
    layer, key, index = _layer()
    x = torch.randn(5, 40, dtype=torch.float64).float()
    TuneCache(cpu_device()).store(tuner.tune_key("forward", key, layer.values.dtype, 5, "cpp"), {"strategy": "dense"})
    ran = []
    for kind in {type(s) for s in STRATEGIES.values()}:  # record which strategy's forward runs
        forward = kind.forward
        monkeypatch.setattr(kind, "forward", lambda self, *a, f=forward: ran.append(self.name) or f(self, *a))
    with config.patch(backend="auto"), torch.no_grad():
        y = layer(x)
    assert ran == ["dense"]
    torch.testing.assert_close(y.double(), x.double() @ layer.dense_weight().double().T, rtol=1e-5, atol=1e-5)
    with config.patch(backend="cpp"), torch.no_grad():
        layer(x)  # a named backend is never overridden by a tuned choice
    assert ran == ["dense", "cpp"]


def test_autotune_on_first_use_tunes_and_stores(monkeypatch):
    layer, key, index = _layer()
    monkeypatch.setattr(
        tuner, "default_timer", lambda device_type: _timer({"cpp": 3.0, "torch-csr": 1.0, "dense": 2.0}, [])
    )
    with config.patch(backend="auto", autotune=True), torch.no_grad():
        layer(torch.randn(2, 40))
    entry = TuneCache(cpu_device()).get(tuner.tune_key("forward", key, layer.values.dtype, 2, "cpp"))
    assert entry["strategy"] == "torch-csr" and entry["timings"] == {"cpp": 3.0, "torch-csr": 1.0, "dense": 2.0}


# --- sparsec tune ------------------------------------------------------------------------------------------


def test_sparsec_tune_tunes_every_layer_and_moves_the_cache(tmp_path, monkeypatch, capsys):
    from sparsec import cli

    (tmp_path / "tiny_model_for_tune.py").write_text(
        "import torch, sparsec\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(sparsec.SparseLinear(16, 24, spec='2:4'), torch.nn.ReLU(),\n"
        "                               sparsec.SparseLinear(24, 8, spec='75%'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    seconds = {"cpp": 1e-3, "cpp-scatter": 1.5e-3, "cpp-transposed": 1.5e-3, "torch-csr": 2e-3, "dense": 4e-3}
    monkeypatch.setattr(tuner, "default_timer", lambda device_type: _timer(seconds, []))
    assert cli.main(["tune", "tiny_model_for_tune:build", "--batch", "3", "--export", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 0 ") or line.startswith("| 2 ")]
    assert len(rows) == 6  # two layers x three programs at one batch
    assert all("| cpp | 1.000 | 4.00x |" in row for row in rows)
    assert "exported 6 entries" in out
    assert len(TuneCache(cpu_device()).entries()) == 6
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cli.main(["tune", "--import", str(tmp_path / "t.json")]) == 0
    assert len(TuneCache(cpu_device()).entries()) == 6
    assert cli.main(["tune", "no_colon_here"]) == 2
    assert "not module:function" in capsys.readouterr().err


def test_semi_structured_runs_only_the_forward_of_half_2_4_layers_on_sparse_tensor_cores():
    semi = STRATEGIES["semi-structured"]
    layer, key, _ = _layer("2:4", 64, 128)
    half = layer.values.detach().half()
    assert semi.fits("forward", key, half) is None
    assert "forward only" in semi.fits("grad_input", key, half)
    assert "fp16 and bf16" in semi.fits("forward", key, layer.values)
    _, key90, _ = _layer("90%", 64, 128)
    assert "runs 2:4 layers" in semi.fits("forward", key90, half)
    _, odd, _ = _layer("2:4", 24, 40)
    assert "multiples of 64" in semi.fits("forward", odd, half)
    assert semi.problem("cpu") == "semi-structured runs on cuda"
    calls = []
    result = _tune("forward", layer, key, list(layer.index_buffers().values()), 4, {"cpp": 1.0, "torch-csr": 2.0,
                   "dense": 3.0}, calls, candidates=[STRATEGIES["cpp"], semi])  # fmt: skip
    assert {o.strategy: o.status for o in result.outcomes} == {"cpp": "chosen", "semi-structured": "pruned"}


def test_the_summary_gives_the_share_of_the_roofline_cap_on_a_listed_gpu():
    layer, key, index = _layer("2:4", 64, 128)
    tkey = tuner.tune_key("forward", key, torch.float16, 8, "cpp")
    result = tuner.TuneResult(tkey, "triton", 2e-6, 4e-6, ())
    program = compile_layer("2:4", 128, 64, "fp16", False, None).kernels["forward"].program
    cost = dict(next(program.node(n) for n in program.order() if program.node(n).attr("cost")).attr("cost"))
    cap = roofline(cost, "fp16", GPUS["H100"], 8, 64, 128)["t_sparse"]
    assert 0 < cap < 2e-6
    row = summary([("fc", "forward", 8, result, "2:4")], "NVIDIA H100 80GB HBM3").splitlines()[-1]
    assert row == f"| fc | forward | 8 | triton | 0.002 | 2.00x | {cap / 2e-6:.0%} |"
    assert summary([("fc", "forward", 8, result, "2:4")], None).splitlines()[-1].endswith("| 2.00x | - |")
    assert summary([("fc", "forward", 8, result, "2:4")], "Some GPU").splitlines()[-1].endswith("| - |")


@pytest.mark.parametrize("stored", [{"tile": {"NO_SUCH_TILE": 32}}, {"tile": "not a mapping"}])
def test_an_entry_whose_configuration_no_longer_applies_is_not_used(stored):
    layer, key, _ = _layer()
    v = layer.values
    TuneCache(cpu_device()).store(
        tuner.tune_key("forward", key, v.dtype, 3, "cpp"), {"strategy": "dense", "config": stored}
    )
    assert tuner.explain_choice("forward", key, "cpp", v, 3) == ("cpp", "default")
    TuneCache(cpu_device()).store(
        tuner.tune_key("forward", key, v.dtype, 3, "cpp"), {"strategy": "dense", "config": {"tile": {"BLOCK_B": 32}}}
    )
    tuner.forget_choices()
    assert tuner.explain_choice("forward", key, "cpp", v, 3) == ("dense", "exact entry")  # a size the kernel has


def test_the_ranking_model_prices_a_batch_split_by_its_fill_and_its_partial_sums():
    layer, _, _ = _layer("90%", 64, 96)  # 615 kept: 20 programs of 32 entries for the SDDMM (BLOCK_E=32)
    lay, batch = layer.layout, 4096
    split = tuner.LaunchConfig((("SPLIT", 8),))
    acts = batch * (64 + 96) * 4
    assert lay.nnz == 615
    plain = (615 * 8 + acts) / (20 / 264)  # a GPU of 132 units: 20 programs fill 20 of its 264 places
    split_cost = (615 * 8 + acts + 2 * 8 * 615 * 4) / (160 / 264)  # 8 shares: 160 programs, partials out and in
    cost = lambda c, units: tuner.config_cost("grad_values", lay, c, batch, torch.float32, units)  # noqa: E731
    assert cost(None, 132) == pytest.approx(plain) and cost(split, 132) == pytest.approx(split_cost)
    assert cost(split, 132) < cost(None, 132)  # a short layer on a long batch: the split fills the GPU
    assert cost(split, 2) > cost(None, 2)  # already full (2 units): the partial sums are pure cost


@pytest.mark.parametrize("tuned", ["cpp-scatter", "cpp-transposed", "torch-csr"])
def test_eager_training_runs_a_tuned_walk_of_grad_input_and_another_strategy_through_the_op(tuned, monkeypatch):
    import sparsec.runtime.cpp as cpp

    torch.manual_seed(0)
    layer = sparsec.SparseLinear(300, 40, spec="90%")  # the rule walks W^T here (a gradient wider than dy)
    x, dy = torch.randn(64, 300, requires_grad=True), torch.randn(64, 40)
    plan = ops.index_plan(ops._key(layer.values, *layer.layout.op_key), "cpp", list(layer.index_buffers().values()))
    assert not cpp.scatters_grad_input(plan, 64, torch.float32)
    chosen = {"grad_input": STRATEGIES[tuned]}
    monkeypatch.setattr(ops, "choose", lambda program, *a, **k: chosen.get(program, STRATEGIES["cpp"]))
    walked = []
    scatter = cpp._scatter_tiles_product
    monkeypatch.setattr(cpp, "_scatter_tiles_product", lambda *a: walked.append("rows") or scatter(*a))
    with sparsec.config.patch(backend="auto"):
        y = layer(x)
        y.backward(dy)
    eager = type(y.grad_fn).__name__ == "_EagerTrainingBackward"
    assert eager == (tuned != "torch-csr")  # cpp's walks train eagerly; another strategy runs through the op
    assert walked == (["rows"] if tuned == "cpp-scatter" else [])
    torch.testing.assert_close(x.grad.double(), dy.double() @ layer.dense_weight().double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "built_before,faster", [(False, "cpp-scatter"), (True, "cpp-scatter"), (False, "cpp-transposed")]
)
def test_tuning_grad_input_leaves_the_layers_w_t_as_it_found_it(built_before, faster):
    """Timing cpp-transposed builds W^T on the layer's own plan; a layer that did not hold it before is not
    left holding its memory when the walk chosen scatters through W's rows, and keeps it when the walk chosen
    is W^T's (no second build at its next call); one that held it keeps it."""
    layer, key, index = _layer("90%", 48, 40)
    plan = ops.index_plan(key, "cpp", index)
    if built_before:
        plan.transposed()
    walked = []
    transposed = type(plan).transposed

    def counting(p):
        walked.append("columns")
        return transposed(p)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(plan), "transposed", counting)
        candidates = [STRATEGIES["cpp-scatter"], STRATEGIES["cpp-transposed"]]
        seconds = {"cpp-scatter": 1.0, "cpp-transposed": 2.0 if faster == "cpp-scatter" else 0.5}
        result = _tune("grad_input", layer, key, index, 64, seconds, [], candidates=candidates)
    assert walked and result.chosen == faster
    held = held_plan(index, "cpp")
    assert held is plan and (held.offsets_t is not None) == (built_before or faster == "cpp-transposed")
    dy = torch.randn(64, 48)
    want = dy.double() @ layer.dense_weight().double()  # and W^T, when next walked, is built again right
    got = STRATEGIES["cpp-transposed"].grad_input(key, "cpp", held, dy, layer.values.detach())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stale", [False, True])
def test_a_thread_walking_w_t_while_another_builds_it_waits_for_the_whole_of_it(stale):
    """Thread a builds the layer's W^T (held inside the kernel until b has asked for it): its first build, or
    (stale) its rebuild into the tensors it held, after a mask write; b must neither build it again nor read
    it before a's kernel has filled it."""
    import threading

    import sparsec.runtime.cpp as cpp

    layer, key, index = _layer("90%", 2048, 1024)
    plan = ops.index_plan(key, "cpp", index)
    if stale:
        plan.transposed()
        flat = layer.positions()
        flat = torch.cat([flat[1:], flat[-1:] + 1]) if flat[-1] < 2048 * 1024 - 1 else flat  # another mask
        layer.write_positions(flat)
        assert held_plan(index, "cpp") is plan and plan.stale_t and plan.offsets_t is not None
    inside, proceed, builds, results = threading.Event(), threading.Event(), [], {}
    library = cpp._plan_library

    class HeldKernel:  # the plan library, with its W^T kernel held until the test lets it go
        def __init__(self, lib):
            self.lib = lib

        def sparsec_transpose_plan(self, *args):
            builds.append(1)
            inside.set()
            assert proceed.wait(timeout=30)
            return self.lib.sparsec_transpose_plan(*args)

    def walk(name):
        wt = plan.transposed()
        results[name] = (wt.offsets_t.clone(), wt.cols_t.clone(), wt.order_t.clone())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpp, "_plan_library", lambda *types: HeldKernel(library(*types)))
        a = threading.Thread(target=walk, args=("a",))
        a.start()
        assert inside.wait(timeout=30)
        b = threading.Thread(target=walk, args=("b",))
        b.start()
        b.join(timeout=0.3)  # b waits on a's build (the bug: it returns now, with W^T's tensors unfilled)
        proceed.set()
        a.join()
        b.join()
    assert len(builds) == 1
    # W^T by hand: each entry's row, the entries in (column, row) order, and where each column starts
    rows = torch.repeat_interleave(torch.arange(plan.shape[0]), plan.offsets.long().diff())
    cols = plan.cols.long()
    order = torch.argsort(cols, stable=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(cols, minlength=plan.shape[1]).cumsum(0)])
    for name in "ab":  # what each thread read is the whole of W^T
        offsets_t, cols_t, order_t = results[name]
        assert torch.equal(offsets_t, starts) and torch.equal(cols_t.long(), rows[order]), name
        assert torch.equal(order_t.long(), order), name
