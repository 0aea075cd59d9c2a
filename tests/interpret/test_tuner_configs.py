"""The Triton configuration space in Triton's interpreter: every configuration the tuner tries for a
program computes the product (the correctness gate passes for each, on odd shapes), a stored
configuration comes back from the cache and runs in the layer's kernels."""

import pytest
import torch

import sparsec
from sparsec.runtime import ops, tuner
from sparsec.runtime.devices import Device
from sparsec.runtime.launch import LaunchConfig, Launcher
from sparsec.runtime.strategies import Triton
from sparsec.runtime.tunecache import TuneCache

# a fake CPU-side device: the interpreter runs these kernels on CPU tensors
FAKE = Device("cpu", "Interpreter", "none", 2, (("triton", "3.8.0"),))
TRITON_ON_CPU = Triton("triton", ("cpu",))
CASES = [("90%", 37, 53), ("2:4", 37, 52), ("block(16x16, 50%)", 48, 80), ("fanin(k=7)", 37, 53)]


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    tuner.forget_choices()
    yield
    tuner.forget_choices()


def _layer(spec, out, inn):
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(inn, out, bias=False, spec=spec, policy=sparsec.static)
    return layer, ops._key(layer.values, *layer.layout.op_key), list(layer.index_buffers().values())


def _fixed_timer(seconds_of):
    def timer(fn):
        fn()
        return seconds_of(fn.__defaults__[0])

    return timer


def test_the_space_starts_at_the_defaults_and_moves_one_size_at_a_time():
    _, key, _ = _layer("2:4", 37, 52)
    configs = tuner.launch_configs("forward", key, torch.float32)
    assert configs[0] == LaunchConfig() and len(set(configs)) == len(configs)
    tiles = [dict(c.tile) for c in configs if c.tile]
    assert tiles and all(len(t) == 1 for t in tiles)
    assert {name for t in tiles for name in t} == {"BLOCK_B", "BLOCK_O", "BLOCK_K", "GROUP"}
    sides = [v for t in tiles for name, v in t.items() if name != "GROUP"]
    assert all(v % 4 == 0 and v >= 16 for v in sides)  # dot sides, whole 2:4 groups
    assert {dict(c.tile).get("GROUP") for c in configs} == {None, 4, 8}
    sddmm = {name for c in tuner.launch_configs("grad_values", key, torch.float32) for name in dict(c.tile)}
    assert {"GROUP", "SPLIT"} <= sddmm
    launch = [(c.num_warps, c.num_stages) for c in configs if c.num_warps]
    assert len(launch) == 8 and (4, 3) not in launch  # Triton's own defaults are the first config


@pytest.mark.parametrize("program", ["forward", "grad_input", "grad_values"])
@pytest.mark.parametrize("spec,out,inn", CASES)
def test_every_configuration_passes_the_gate(spec, out, inn, program):
    layer, key, index = _layer(spec, out, inn)
    result = tuner.tune_program(
        program, key, index, layer.values, 5, backend="interpret", candidates=[TRITON_ON_CPU],
        timer=_fixed_timer(lambda s: 1.0), top_configs=100, cache=TuneCache(FAKE), device=FAKE,
    )  # fmt: skip
    statuses = {o.strategy: o.status for o in result.outcomes}
    assert len(statuses) == len(tuner.launch_configs(program, key, torch.float32)) > 8
    assert set(statuses.values()) == {"chosen", "timed"}, {k: v for k, v in statuses.items() if v not in ("timed",)}


def test_a_tuned_configuration_is_stored_looked_up_and_run_by_its_strategy(monkeypatch):
    layer, key, index = _layer("90%", 37, 53)
    fast = LaunchConfig((("BLOCK_J", 8),))
    cache = TuneCache(FAKE)
    result = tuner.tune_program(
        "forward", key, index, layer.values, 5, backend="interpret", candidates=[TRITON_ON_CPU],
        timer=_fixed_timer(lambda s: 1e-3 if s.config == fast else 1.0), top_configs=8, cache=cache, device=FAKE,
    )  # fmt: skip
    assert result.chosen == "triton[BLOCK_J=8]"
    status = {o.strategy: o.status for o in result.outcomes}
    # 37 outputs in 64-row tiles leave the fake device's 2 units short of programs: ranked out, never run
    assert status["triton[BLOCK_O=64]"] == "not timed" and status["triton[defaults]"] == "timed"
    entry = cache.get(result.key)
    assert entry["strategy"] == "triton" and entry["config"]["tile"] == {
        "BLOCK_B": 16,
        "BLOCK_O": 16,
        "BLOCK_J": 8,
        "GROUP": 1,
    }
    # the layer's lookup (the real CPU device's cache) reads the entry back with its configuration
    TuneCache(tuner.device_of(layer.values)).store(result.key, entry)
    monkeypatch.setitem(tuner.STRATEGIES, "triton", TRITON_ON_CPU)  # the interpreter's Triton runs on the CPU
    ran = []
    run = Launcher.run

    def recording(self, program, plan, cfg=None, **operands):
        ran.append((program, cfg))
        return run(self, program, plan, cfg, **operands)

    monkeypatch.setattr(Launcher, "run", recording)
    assert tuner.explain_choice("forward", key, "interpret", layer.values, 5) == (
        "triton[BLOCK_B=16,BLOCK_J=8,BLOCK_O=16,GROUP=1]",
        "exact entry",
    )
    chosen = tuner.choose("forward", key, "interpret", layer.values, 5)
    assert chosen.config == LaunchConfig((("BLOCK_B", 16), ("BLOCK_J", 8), ("BLOCK_O", 16), ("GROUP", 1)))
    x = torch.randn(5, 53)
    plan = ops.index_plan(key, chosen.plan_kind("interpret"), index)
    with torch.no_grad():
        y = chosen.forward(key, "interpret", plan, x, layer.values, None)
    assert ran == [("forward", chosen.config)]
    torch.testing.assert_close(y.double(), x.double() @ layer.dense_weight().double().T, rtol=1e-5, atol=1e-5)


def test_configurations_the_compile_rejects_are_pruned_and_never_run(monkeypatch):
    layer, key, index = _layer("2:4", 37, 52)
    gpu = Device("cuda", "Fake GPU", "sm_90", 132, (("triton", "3.8.0"),))
    compiled = []

    def compile_problem(program, key, dtype, batch, config, cc):
        compiled.append((config, cc))
        return "ptxas spills 8 bytes of registers for sm_90" if dict(config.tile).get("BLOCK_B") == 128 else None

    monkeypatch.setattr(tuner, "aot_pruning", lambda device: 90 if device.kind == "cuda" else None)
    monkeypatch.setattr(tuner, "compile_problem", compile_problem)
    ran = []
    result = tuner.tune_program(
        "forward", key, index, layer.values, 5, backend="interpret", candidates=[TRITON_ON_CPU],
        timer=_fixed_timer(lambda s: ran.append(s.config) or 1.0), top_configs=100, cache=TuneCache(gpu), device=gpu,
    )  # fmt: skip
    configs = tuner.launch_configs("forward", key, torch.float32)
    # the defaults (what the untuned path runs) are timed whatever their report: every other one is compiled
    assert [c for c, _ in compiled] == configs[1:] and {cc for _, cc in compiled} == {90}
    status = {o.strategy: (o.status, o.reason) for o in result.outcomes}
    assert status["triton[BLOCK_B=128]"] == ("pruned", "ptxas spills 8 bytes of registers for sm_90")
    assert LaunchConfig((("BLOCK_B", 128),)) not in ran and len(ran) == len(configs) - 1
