"""The autotuner: the fastest correct strategy for one layer program on one device, stored and looked up.

``tune_program`` takes a layer's program (forward, grad_input, grad_values) at a batch size through:

1. candidates: every strategy that runs on the device (``runtime.strategies``);
2. pruning: a candidate that cannot run here is rejected with its reason; the rest are ranked by a
   bytes-moved model and only the ``top`` few are timed;
3. timing and a correctness gate: each timed candidate's result is compared with the float64 product of
   the same weights first, and a wrong one is never chosen however fast; then the median time (the
   timer is injectable: tests drive the whole tuner with a fake one);
4. the winner goes into the device's ``TuneCache``.

``choose`` is the lookup the ops make on every call under ``SPARSEC_BACKEND=auto`` (memoised per process):
the exact entry, else the nearest batch bucket's, else (``SPARSEC_AUTOTUNE=1``) tuning now, else the
backend's default strategy, with one warning per kernel where this device has a tuning cache at all (a
user who never tuned is not warned on every layer).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer as BenchTimer

from sparsec import config
from sparsec.codegen.cache import interpreting
from sparsec.codegen.render import render
from sparsec.dtypes import name_of as dtype_name
from sparsec.formats import Layout, LayoutKey, format_of, layout_of
from sparsec.runtime.aot import SHARED_LIMITS, compile_call, record_calls
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.cpp import INDEX_TYPES, KERNEL_TYPES, CppPlan, scatters_grad_input
from sparsec.runtime.devices import Device, device_of
from sparsec.runtime.launch import LaunchConfig, batch_split
from sparsec.runtime.plans import held_plan, index_plan
from sparsec.runtime.strategies import DEFAULT, PROGRAMS, STRATEGIES, Cpp, Strategy, Triton
from sparsec.runtime.tunecache import TuneCache, TuneKey, TuningWarning, batch_bucket, density_bucket
from sparsec.spec import parse_spec

Timer = Callable[[Callable[[], object]], float]  # a function's median seconds per call


@dataclass(frozen=True)
class Outcome:
    strategy: str
    status: str  # chosen, timed, wrong, failed, pruned, not timed
    seconds: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class TuneResult:
    key: TuneKey
    chosen: str | None  # the strategy stored, or None (no candidate was correct)
    seconds: float | None
    dense_seconds: float | None
    outcomes: tuple[Outcome, ...]


def tune_key(program: str, key: LayoutKey, dtype: torch.dtype, batch: int, backend: str) -> TuneKey:
    layout = layout_of(*key)
    density = layout.nnz / max(1, layout.out_features * layout.in_features)
    return TuneKey(
        program,
        layout.op_key.spec,  # the structure without its count
        density_bucket(density),
        dtype_name(dtype),
        layout.out_features,
        layout.in_features,
        batch_bucket(batch),
        source_hash(key, dtype_name(dtype), backend),
    )


def source_hash(key: LayoutKey, dtype: str, backend: str) -> str:
    """The hash of the generated source a layer's candidates run: a template change invalidates its entries."""
    if backend in ("triton", "interpret"):
        return _triton_source_hash(key, dtype)
    return _cpp_source_hash(dtype)  # one translation unit per dtype serves every CPU layer


@functools.cache
def _triton_source_hash(key: LayoutKey, dtype: str) -> str:
    kernels = compile_layer(key.spec, key.in_features, key.out_features, dtype, False, None)
    return hashlib.sha256("".join(k.source for k in kernels.kernels.values()).encode()).hexdigest()[:16]


@functools.cache
def _cpp_source_hash(dtype: str) -> str:
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}.get(dtype, torch.float64)
    scalar, io = KERNEL_TYPES[torch_dtype]
    text = "".join(
        render("cpu/rows.cpp.jinja", scalar=scalar, io=io, index=index, slot="int32_t")
        for index in INDEX_TYPES.values()
        if index != "int64_t"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def candidates_for(device_type: str) -> list[Strategy]:
    return [s for s in STRATEGIES.values() if device_type in s.devices]


# --- the Triton configuration space ------------------------------------------------------------------

WARPS, STAGES = (2, 4, 8), (2, 3, 4)
TRITON_DEFAULTS = (4, 3)  # Triton's num_warps, num_stages where a launch sets neither


def launch_configs(program: str, key: LayoutKey, dtype: torch.dtype) -> list[LaunchConfig]:
    """The configurations tried for a program's Triton kernel: the defaults first, then each tunable tile
    size and grid constexpr (``formats.Strategy.tile_space``, ``grid_space``) moved alone to each of its
    other values, then num_warps x num_stages at the default tile. A coordinate search around the default
    (about 20 configurations), not the full grid: every configuration is compiled before any is timed, and
    on a GPU that is the cost."""
    spec = parse_spec(key.spec)
    tile = default_tile(program, key, dtype)
    strategy = format_of(spec).strategy(spec)
    space = {**strategy.tile_space(program, dtype_name(dtype)), **strategy.grid_space(program)}
    configs = [LaunchConfig()]
    configs += [LaunchConfig(((name, v),)) for name, values in space.items() for v in values if v != tile[name]]
    configs += [LaunchConfig((), w, st) for w in WARPS for st in STAGES if (w, st) != TRITON_DEFAULTS]
    return configs


def default_tile(program: str, key: LayoutKey, dtype: torch.dtype) -> dict[str, int]:
    """The tile a program's generated kernel runs at untuned (the tiling pass's)."""
    return (
        compile_layer(key.spec, key.in_features, key.out_features, dtype_name(dtype), False, None).kernels[program].tile
    )


def variants(strategy: Strategy, program: str, key: LayoutKey, dtype: torch.dtype) -> list[Strategy]:
    """A strategy's candidates for one program: one per configuration where it has a space (Triton)."""
    if not isinstance(strategy, Triton):
        return [strategy]
    return [strategy.with_config(c) for c in launch_configs(program, key, dtype)]


def compile_problem(
    program: str, key: LayoutKey, dtype: torch.dtype, batch: int, config: LaunchConfig, cc: int
) -> str | None:
    """Why a configuration is rejected before timing (None: kept), from its ahead-of-time compile for
    compute capability ``cc`` (``runtime.aot``): ptxas spills registers, the kernel needs more shared memory
    than a block may have, or it lost the tensor-core instructions (mma.sync, wgmma) the default config's
    compile has."""
    try:
        report = _compile_report(program, key, dtype_name(dtype), batch, config, cc)
    except Exception as e:  # a configuration Triton cannot compile is rejected with its reason
        return f"does not compile for sm_{cc}: {type(e).__name__}: {e}"[:200]
    if report["spill_bytes"]:
        return f"ptxas spills {report['spill_bytes']} bytes of registers for sm_{cc}"
    if report["shared_bytes"] > report["shared_limit"]:
        return f"needs {report['shared_bytes']} bytes of shared memory; sm_{cc} gives a block {report['shared_limit']}"
    try:
        base = _compile_report(program, key, dtype_name(dtype), batch, LaunchConfig(), cc)
    except Exception:  # no baseline to compare tensor-core use with
        return None
    if base["wgmma"] and not report["wgmma"]:
        return f"loses wgmma on sm_{cc} (the default config has {base['wgmma']})"
    if base["mma_sync"] + base["wgmma"] and not report["mma_sync"] + report["wgmma"]:
        return f"loses the tensor-core mma instructions on sm_{cc}"
    return None


@functools.lru_cache(maxsize=4096)
def _compile_report(program: str, key: LayoutKey, dtype: str, batch: int, config: LaunchConfig, cc: int) -> dict:
    calls = record_calls(key.spec, key.out_features, key.in_features, dtype, batch, {program: config})
    return compile_call(next(c for c in calls if c.program == program), cc)


def aot_pruning(device: Device) -> int | None:
    """The compute capability configurations are compiled for before timing, or None where they cannot be
    (not a GPU, or this process runs Triton's interpreter, which replaces the compiler)."""
    if device.kind != "cuda" or interpreting() or not device.arch.startswith("sm_"):
        return None
    cc = int(device.arch[3:])
    return cc if cc in SHARED_LIMITS else None  # an unlisted GPU: its configurations are timed unpruned


def config_cost(
    program: str, layout: Layout, config: LaunchConfig | None, batch: int, dtype: torch.dtype, units: int
) -> float:
    """The ranking model of a configuration (not a time): the bytes its launch moves, with the weight read
    again by every batch tile and a split-batch's float32 partial sums written and read back, over the
    share of the GPU its grid fills (under two programs per SM, the units left idle are lost). Grouping
    (``GROUP``) moves the same bytes in this model: what it saves is L2 misses, which only timing sees."""
    strategy = layout.format.strategy(layout.spec)
    elem = dtype.itemsize
    tile = {**default_tile(program, layout.key, dtype), **dict(config.tile if config is not None else ())}
    split = batch_split(program, tile)
    programs = math.prod(strategy.call(program, layout, tile, {}, batch).grid) * split
    batch_tiles = math.ceil(batch / tile["BLOCK_B"]) if program != "grad_values" and "BLOCK_B" in tile else 1
    moved = layout.nnz * (elem + 4) * batch_tiles + batch * (layout.out_features + layout.in_features) * elem
    moved += 2 * split * layout.nnz * 4 if split > 1 else 0
    return moved / min(1.0, programs / (2 * max(1, units)))


def estimated_bytes(strategy: Strategy, layout: Layout, batch: int, elem: int) -> float:
    """The bytes a strategy moves for one program call: the ranking of the pruning step (a model, not a time)."""
    dense = layout.out_features * layout.in_features * elem
    acts = batch * (layout.out_features + layout.in_features) * elem
    if strategy.name == "dense":
        return 3 * dense + acts  # decompress (write, read) and the GEMM's read
    index = {"torch-csr": 8}.get(strategy.name, 2 if strategy.name.startswith("cpp") else 4)
    return layout.nnz * (elem + index) + acts


def default_timer(device_type: str) -> Timer:
    if device_type == "cuda":
        import triton.testing  # lazy: triton is optional (Linux only) and heavy; only GPU timing needs it

        return lambda fn: triton.testing.do_bench(fn, return_mode="median") / 1e3  # L2 flushed between runs

    def cpu_median(fn):
        return (
            BenchTimer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            .blocked_autorange(min_run_time=0.2)
            .median
        )

    return cpu_median


def _run(strategy: Strategy, program: str, key: LayoutKey, backend: str, index, operands: dict) -> torch.Tensor:
    plan = index_plan(key, strategy.plan_kind(backend), index)
    v = operands["values"]
    if program == "forward":
        return strategy.forward(key, backend, plan, operands["x"], v, operands["bias"])
    if program == "grad_input":
        return strategy.grad_input(key, backend, plan, operands["dy"], v)
    return strategy.grad_values(key, backend, plan, operands["dy"], operands["x"], v)


def _reference(program: str, layout: Layout, index, operands: dict) -> torch.Tensor:
    """The float64 result of the same weights (the correctness gate's)."""
    buffers = {name: t for (name, _, _), t in zip(layout.buffers, index, strict=True)}
    flat = layout.decode(buffers)
    w = layout.to_dense(operands["values"].detach().double(), flat).view(layout.out_features, layout.in_features)
    x, dy = operands["x"].double(), operands["dy"].double()
    if program == "forward":
        y = x @ w.T
        return y if operands["bias"] is None else y + operands["bias"].double()
    if program == "grad_input":
        return dy @ w
    return layout.values_from_dense(dy.T @ x, flat)


def _holds_transposed(index: list[torch.Tensor]) -> bool:
    """Whether the layer's cpp plan holds W^T (single weights build it at first use: ``CppPlan.transposed``)."""
    plan = held_plan(index, "cpp")
    return isinstance(plan, CppPlan) and plan.offsets_t is not None


def _walks_transposed(strategy: Strategy | None, index: list[torch.Tensor], batch: int, dtype: torch.dtype) -> bool:
    """Whether ``strategy``'s ``grad_input`` at ``batch`` walks the layer's W^T (cpp-transposed, or cpp where
    its rule walks W^T there): the layer will use the W^T its tuning built."""
    if not isinstance(strategy, Cpp) or strategy.walk == "rows":
        return False
    return strategy.walk == "columns" or not scatters_grad_input(held_plan(index, "cpp"), batch, dtype)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    if got.shape != want.shape:
        return False
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    scale = want.abs().max().item() if want.numel() else 0.0
    return bool(torch.allclose(got.double(), want, rtol=tol, atol=tol * max(scale, 1e-30)))


def tune_program(
    program: str,
    key: LayoutKey,
    index: list[torch.Tensor],
    values: torch.Tensor,
    batch: int,
    *,
    backend: str,
    bias: torch.Tensor | None = None,
    candidates: Sequence[Strategy] | None = None,
    timer: Timer | None = None,
    top: int = 6,
    top_configs: int = 16,
    cache: TuneCache | None = None,
    device: Device | None = None,
) -> TuneResult:
    """Tune ``program`` of the layer (``key``, its ``index`` buffers and ``values``) at ``batch`` rows; store
    the winner in ``cache`` (default: the device's)."""
    if program not in PROGRAMS:
        raise ValueError(f"program {program!r} is not one of {PROGRAMS}")
    layout, device_type = layout_of(*key), values.device.type
    device = device if device is not None else device_of(values)
    cache = cache if cache is not None else TuneCache(device)
    timer = timer if timer is not None else default_timer(device_type)
    tkey = tune_key(program, key, values.dtype, batch, backend)
    outcomes: list[Outcome] = []
    families: dict[str, list[Strategy]] = {}
    cc = aot_pruning(device)
    for strategy in candidates if candidates is not None else candidates_for(device_type):
        problem = strategy.problem(device_type) or strategy.fits(program, key, values)
        if problem is not None:
            outcomes.append(Outcome(strategy.label, "pruned", reason=problem))
            continue
        for variant in variants(strategy, program, key, values.dtype):
            problem = (  # the defaults are what the untuned path runs: timed whatever their report says
                None
                if cc is None or variant.config in (None, LaunchConfig())
                else compile_problem(program, key, values.dtype, batch, variant.config, cc)
            )
            if problem is not None:
                outcomes.append(Outcome(variant.label, "pruned", reason=problem))
            else:
                families.setdefault(strategy.name, []).append(variant)
    elem, units = values.element_size(), device.units
    for members in families.values():  # configurations ranked within their strategy
        members.sort(
            key=lambda s: config_cost(program, layout, s.config, batch, values.dtype, units) if s.config else 0.0
        )
    ranked = sorted(families.values(), key=lambda m: estimated_bytes(m[0], layout, batch, elem))
    viable = [s for members in ranked[:top] for s in members[:top_configs]]
    outcomes += [
        Outcome(s.label, "not timed", reason=f"ranked below the top {top}") for members in ranked[top:] for s in members
    ]
    outcomes += [
        Outcome(s.label, "not timed", reason=f"ranked below its strategy's top {top_configs} configurations")
        for members in ranked[:top]
        for s in members[top_configs:]
    ]
    gen = torch.Generator(device="cpu").manual_seed(0)
    operands = {
        "x": torch.randn(batch, layout.in_features, generator=gen).to(values.device, values.dtype),
        "dy": torch.randn(batch, layout.out_features, generator=gen).to(values.device, values.dtype),
        "values": values.detach(),
        "bias": None if bias is None else bias.detach(),
    }
    want = _reference(program, layout, index, operands)
    if any(s.plan_kind(backend) == "cpp" for s in viable):  # the layer's plan as its own calls build it
        index_plan(key, "cpp", index)
    had_transposed = _holds_transposed(index)  # blocks' plans hold it from the start; single weights' on use
    timed: dict[str, float] = {}
    by_label: dict[str, Strategy] = {}
    for strategy in viable:
        try:
            with torch.no_grad():
                got = _run(strategy, program, key, backend, index, operands)
        except Exception as e:  # a candidate that fails here is not chosen; the reason is reported
            outcomes.append(Outcome(strategy.label, "failed", reason=f"{type(e).__name__}: {e}"[:200]))
            continue
        if not _close(got, want, values.dtype):
            outcomes.append(Outcome(strategy.label, "wrong", reason="differs from the float64 product"))
            continue

        def call(strategy=strategy):
            with torch.no_grad():
                _run(strategy, program, key, backend, index, operands)

        timed[strategy.label] = timer(call)
        by_label[strategy.label] = strategy
    chosen = min(timed, key=timed.get) if timed else None
    outcomes += [Outcome(n, "chosen" if n == chosen else "timed", s) for n, s in timed.items()]
    winner = by_label.get(chosen)
    if not had_transposed and _holds_transposed(index) and not _walks_transposed(winner, index, batch, values.dtype):
        held_plan(index, "cpp").release_transposed()  # built only to time cpp-transposed: not the layer's walk
    result = TuneResult(tkey, chosen, timed.get(chosen), timed.get("dense"), tuple(outcomes))
    if winner is not None:
        cache.store(
            tkey,
            {
                "strategy": winner.name,
                "config": _resolved(winner.config, program, key, values.dtype),
                "seconds": timed[chosen],
                "dense_seconds": timed.get("dense"),
                "timings": timed,
                "rejected": {o.strategy: o.reason for o in outcomes if o.status in ("wrong", "failed", "pruned")},
                "tuned": datetime.date.today().isoformat(),
            },
        )
    forget_choices()
    return result


# --- lookup ------------------------------------------------------------------------------------------

_chosen: dict[tuple, tuple[Strategy, str]] = {}


def _settings_read() -> tuple:
    """What a memoised choice also depends on, read cheaply."""
    return config.raw("cache_dir"), config.raw("autotune")


_warned: set[str] = set()


def forget_choices() -> None:
    """Drop the memoised lookups (after a store, an import, a changed cache directory)."""
    _chosen.clear()


def choose(
    program: str,
    key: LayoutKey,
    backend: str,
    values: torch.Tensor,
    batch: int,
    index: list[torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
) -> Strategy:
    """The strategy ``program`` runs for this layer at ``batch`` rows (see the module docstring)."""
    memo = (program, key, backend, values.dtype, values.device, batch_bucket(batch), *_settings_read())
    found = _chosen.get(memo)
    if found is None:
        found = _lookup(program, key, backend, values, batch, index, bias)
        _chosen[memo] = found
    return found[0]


def explain_choice(program: str, key: LayoutKey, backend: str, values: torch.Tensor, batch: int) -> tuple[str, str]:
    """(strategy with its configuration, where the choice came from: exact entry, nearest batch bucket,
    default)."""
    strategy, source = _lookup(program, key, backend, values, batch, None, None, warn=False)
    return strategy.label, source


def _resolved(config: LaunchConfig | None, program: str, key: LayoutKey, dtype: torch.dtype) -> dict:
    """What is stored of a winning configuration: every tile size it ran with (not a change over defaults
    that a later release may move), and its launch options."""
    if config is None:
        return {}
    tile = {**default_tile(program, key, dtype), **dict(config.tile)}
    return {**config.as_dict(), "tile": tile}


def _stored_config(entry: dict, program: str, key: LayoutKey, dtype: torch.dtype) -> LaunchConfig | None:
    """The entry's configuration, or None where it names tile sizes this program's kernel lacks (or is
    malformed): then the entry is not used."""
    stored = entry.get("config")
    if not stored:
        return None
    try:
        config = LaunchConfig.from_dict(stored)
        names = default_tile(program, key, dtype).keys()
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    return config if dict(config.tile).keys() <= names else None


def _lookup(program, key, backend, values, batch, index, bias, warn=True) -> tuple[Strategy, str]:
    default = STRATEGIES[DEFAULT[backend]]
    device_type = values.device.type
    cache = TuneCache(device_of(values))
    tkey = tune_key(program, key, values.dtype, batch, backend)
    entry, source = cache.lookup(tkey)
    strategy = STRATEGIES.get((entry or {}).get("strategy"))
    stored = _stored_config(entry, program, key, values.dtype) if strategy is not None else None
    usable = strategy is not None and (stored is not None or not entry.get("config"))
    if usable and (strategy.problem(device_type) or strategy.fits(program, key, values)) is None:
        return strategy.with_config(stored), source
    if config.autotune and index is not None:
        result = tune_program(program, key, index, values, batch, backend=backend, bias=bias, cache=cache)
        if result.chosen is not None:
            entry = cache.get(tkey) or {}
            return STRATEGIES[entry["strategy"]].with_config(_stored_config(entry, program, key, values.dtype)), (
                "tuned now"
            )
    if warn and cache.path.exists() and tkey.text() not in _warned:
        _warned.add(tkey.text())
        warnings.warn(
            f"no tuning entry for {program} of {key.spec} {key.out_features}x{key.in_features} "
            f"({tkey.dtype}, batch bucket {tkey.batch}) on this device: running the default ({default.name}); "
            f"`sparsec tune` or SPARSEC_AUTOTUNE=1 tunes it",
            TuningWarning,
            stacklevel=4,
        )
    return default, "default"


__all__ = ["Outcome", "TuneResult", "choose", "explain_choice", "forget_choices", "tune_key", "tune_program"]
