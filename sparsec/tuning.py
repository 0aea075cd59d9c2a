"""``sparsec tune``: tune every sparse layer of a model for the given batch sizes, and move tuning caches.

The model comes from ``module:function`` (called with no arguments, returning an ``nn.Module``); each
``SparseLinear`` / ``SparseConv2d`` in it is tuned per program (forward, grad_input, grad_values) and batch
on the device its values live on, with a progress bar, and a summary table is printed: the chosen
strategy, its time and its speed-up over the dense strategy (decompress + GEMM) measured beside it.
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn
from tqdm import tqdm

from sparsec.dtypes import KERNEL_DTYPES
from sparsec.errors import SparsecError
from sparsec.nn.layers import SparseLayer
from sparsec.passes.cost import peak_of, roofline
from sparsec.runtime import ops
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.devices import cpu_device, device_of
from sparsec.runtime.strategies import PROGRAMS
from sparsec.runtime.tunecache import TuneCache
from sparsec.runtime.tuner import TuneResult, tune_program


def load_model(target: str) -> nn.Module:
    module_name, sep, function = target.partition(":")
    if not sep or not module_name or not function:
        raise SparsecError(f"model {target!r} is not module:function (e.g. examples.quickstart:build_model)")
    try:
        model = getattr(importlib.import_module(module_name), function)()
    except (ImportError, AttributeError) as e:
        raise SparsecError(f"cannot load {target}: {e}") from None
    if not isinstance(model, nn.Module):
        raise SparsecError(f"{target} returned a {type(model).__name__}, not an nn.Module")
    return model


def tune_model(model: nn.Module, batches: list[int], programs=PROGRAMS, timer=None, progress=True) -> list[tuple]:
    """Tune every sparse layer of ``model``; returns (layer name, program, batch, TuneResult, spec) rows."""
    layers = [(name or "<model>", m) for name, m in model.named_modules() if isinstance(m, SparseLayer)]
    if not layers:
        raise SparsecError("the model has no sparse layers: sparsify it first (sparsec.sparsify)")
    work = [(name, m, p, b) for name, m in layers for b in batches for p in programs]
    rows = []
    for name, layer, program, batch in tqdm(work, desc="tuning", unit="kernel", disable=not progress, file=sys.stderr):
        values = layer.values.detach()
        index = list(layer.index_buffers().values())
        key = ops._key(values, *layer.layout.op_key)
        backend = ops.backend_for(values)
        result = tune_program(program, key, index, values, batch, backend=backend, bias=layer.bias, timer=timer)
        rows.append((name, program, batch, result, str(layer.spec)))
    return rows


def roofline_share(spec: str, r: TuneResult, batch: int, gpu: str | None) -> str:
    """The roofline cap's time over the measured time of a tuned program on a GPU (the cost model's FLOPs and
    bytes against the GPU's datasheet peaks: ``passes.cost``); "-" off a GPU or for a GPU not listed there."""
    peak = peak_of(gpu) if gpu else None
    if peak is None or not r.seconds or r.key.dtype not in KERNEL_DTYPES:
        return "-"
    k = r.key
    kernels = compile_layer(spec, k.in_features, k.out_features, k.dtype, False, None).kernels[k.program].program
    cost = dict(next(kernels.node(n) for n in kernels.order() if kernels.node(n).attr("cost")).attr("cost"))
    cap = roofline(cost, k.dtype, peak, batch, k.out_features, k.in_features)["t_sparse"]
    return f"{cap / r.seconds:.0%}"


def summary(rows: list[tuple[str, str, int, TuneResult, str]], gpu: str | None = None) -> str:
    """The table of a tuning run; ``gpu``: the device's name, for the share of the roofline cap."""
    lines = [
        "| layer | program | batch | chosen | time ms | vs dense | share of the roofline cap |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, program, batch, r, spec in rows:
        chosen = r.chosen or "none correct"
        time = f"{r.seconds * 1e3:.3f}" if r.seconds is not None else "-"
        speed = f"{r.dense_seconds / r.seconds:.2f}x" if r.seconds and r.dense_seconds else "-"
        share = roofline_share(spec, r, batch, gpu)
        lines.append(f"| {name} | {program} | {batch} | {chosen} | {time} | {speed} | {share} |")
    return "\n".join(lines)


def run(args) -> int:
    device = cpu_device() if args.device == "cpu" else device_of(torch.empty(0, device=args.device))
    cache = TuneCache(device)
    if args.import_file:
        print(f"imported {cache.import_(args.import_file)} entries into {cache.path}")
    if args.model:
        model = load_model(args.model).to(args.device)
        rows = tune_model(model, args.batch, programs=args.programs)
        print(summary(rows, device.name if device.kind == "cuda" else None))
    if args.export_file:
        print(f"exported {cache.export(args.export_file)} entries of {cache.path} to {args.export_file}")
    return 0
