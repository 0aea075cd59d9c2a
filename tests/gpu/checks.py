"""What only a GPU can prove, run by tests/gpu/test_gpu.py in a process without TRITON_INTERPRET
(tests/conftest.py sets it for the test process itself): ``python tests/gpu/checks.py CHECK [ARG]``.

- ``kernels DTYPE``: every kernel case through the custom op on the triton backend (generated kernels,
  Triton's JIT) against a float64 dense reference: forward, dX, dV and the bias gradient, at fp32, tf32,
  fp16 and bf16 (the bf16 tl.dot cases the interpreter computes wrongly included).
- ``rigl DTYPE``: a RigL training run in fp16 or bf16 on every structure, with updates, checking the mask
  invariants after every step.
- ``autocast``: a dense layer's fp16 activation into a sparse layer under CUDA autocast.
- ``second_device``: a layer on cuda:1 while cuda:0 is current (skipped with one GPU).
- ``tuner``: the autotuner end to end (configurations, pruning, cuSPARSE, cuBLAS, semi-structured 2:4), and
  the layer running its choices.
- ``export``: ``sparsec.export(..., "semi_structured")`` of a 2:4 model in fp16 gives the sparse model's
  outputs (fp16: 1e-2 relative), through PyTorch's semi-structured weight.
- ``cuda_graphs``: a forward captured in a CUDA graph, replayed after mask updates (a RigL step, then a
  mask written directly): the replay computes with the new mask.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/helpers.py

from helpers import assert_kernel_close  # noqa: E402

import sparsec  # noqa: E402
from sparsec import config  # noqa: E402
from sparsec.formats import KERNEL_CASES  # noqa: E402
from sparsec.runtime import ops  # noqa: E402
from sparsec.runtime.devices import device_of  # noqa: E402
from sparsec.runtime.tunecache import TuneCache  # noqa: E402
from sparsec.runtime.tuner import explain_choice  # noqa: E402
from sparsec.tuning import summary, tune_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STRUCTURES = ["90%", "2:4", "1:8", "block(16x16, 75%)", "fanin(90%)"]


def kernels(name: str) -> None:
    dtype = DTYPES[name]
    torch.set_float32_matmul_precision("high" if name == "tf32" else "highest")
    rtol_dtype = torch.bfloat16 if name == "tf32" else dtype  # TF32 keeps 10 mantissa bits, as fp16
    for spec, out, inn in KERNEL_CASES:
        torch.manual_seed(0)
        layer = sparsec.SparseLinear(inn, out, spec=spec, dtype=dtype, device="cuda")
        x = torch.randn(37, inn, dtype=dtype, device="cuda", requires_grad=True)
        with config.patch(backend="triton"):
            y = layer(x)
            dy = torch.randn_like(y)
            y.backward(dy)
        w = layer.dense_weight().double()
        assert_kernel_close(y, x.double() @ w.t() + layer.bias.double(), rtol_dtype, f"{spec} forward")
        assert_kernel_close(x.grad, dy.double() @ w, rtol_dtype, f"{spec} dX")
        dv = layer.layout.values_from_dense(dy.double().t() @ x.detach().double(), layer.positions())
        assert_kernel_close(layer.values.grad, dv, rtol_dtype, f"{spec} dV")
        assert_kernel_close(layer.bias.grad, dy.double().sum(0), rtol_dtype, f"{spec} dbias")
        print("ok", name, spec)


def rigl(name: str) -> None:
    dtype = DTYPES[name]
    for spec in STRUCTURES:
        torch.manual_seed(0)
        model = sparsec.sparsify(
            nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)), spec=spec, policy=sparsec.rigl(delta_t=2)
        ).to(device="cuda", dtype=dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        updater = sparsec.MaskUpdater(model, opt, total_steps=40)
        x, target = torch.randn(256, 64, device="cuda", dtype=dtype), torch.randint(0, 16, (256,), device="cuda")
        grown = 0
        for _ in range(10):
            loss = nn.functional.cross_entropy(model(x).float(), target)
            assert torch.isfinite(loss), (spec, name)
            loss.backward()
            opt.step()
            grown += sum(updater.step().values())
            opt.zero_grad()
            for layer in updater.layers.values():
                layer.layout.check_positions(layer.positions(), what=f"{spec} mask")
        assert grown > 0, (spec, name)
        print("ok rigl", name, spec, "grown", grown)


def autocast() -> None:
    torch.manual_seed(0)
    dense_in = nn.Linear(48, 64).cuda()
    layer = sparsec.SparseLinear(64, 32, spec="2:4", device="cuda")
    x = torch.randn(33, 48, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        h = torch.relu(dense_in(x))
        y = layer(h)
    assert y.dtype == torch.float16
    y.float().square().sum().backward()
    assert layer.values.grad.dtype == torch.float32
    ref = h.detach().double() @ layer.dense_weight().half().double().t() + layer.bias.half().double()
    assert_kernel_close(y, ref, torch.float16, "autocast forward")
    print("ok autocast")


def second_device() -> None:
    if torch.cuda.device_count() < 2:
        print("skip: one GPU")
        return
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(64, 32, spec="90%", device="cuda:1")
    x = torch.randn(9, 64, device="cuda:1")
    with config.patch(backend="triton"):
        y = layer(x)
    ref = x.double() @ layer.dense_weight().double().t() + layer.bias.double()
    assert y.device == torch.device("cuda:1")
    assert_kernel_close(y, ref, torch.float32, "cuda:1 forward")
    print("ok second_device")


def cuda_graphs() -> None:
    torch.manual_seed(0)
    for spec in STRUCTURES:
        layer = sparsec.SparseLinear(
            64, 128, spec=spec, policy=sparsec.rigl(delta_t=1, regrow_dropped=False), device="cuda"
        )
        static_x = torch.randn(33, 64, device="cuda")
        with config.patch(backend="triton"):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                layer(static_x)  # compiles the kernels and builds the plan before capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_y = layer(static_x)
            opt = torch.optim.SGD(layer.parameters(), lr=0.5)
            updater = sparsec.MaskUpdater(layer, opt, total_steps=100)  # arms step 1, after the capture
            before = layer.positions().clone()
            layer(torch.randn(33, 64, device="cuda")).square().sum().backward()  # armed: grow scores
            opt.step()
            assert sum(updater.step().values()) > 0, spec
            assert not torch.equal(layer.positions(), before), spec
            static_x.copy_(torch.randn(33, 64, device="cuda"))
            graph.replay()
        ref = static_x.double() @ layer.dense_weight().double().t() + layer.bias.double()
        assert_kernel_close(static_y, ref, torch.float32, f"{spec} replay after a RigL update")
        print("ok cuda_graphs", spec)


def tuner() -> None:
    """The tuner end to end on the GPU, into a fresh cache: every program of each layer gets a correct choice
    among Triton configurations (pruned by their AOT compile for this GPU), cuSPARSE, cuBLAS dense and, for the
    2:4 forward, semi-structured; the layer then runs the choices under SPARSEC_BACKEND=auto and matches
    float64; the cache file holds the entries."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, config.patch(cache_dir=tmp):
        for spec in ("2:4", "90%", "block(16x16, 75%)"):
            layer = sparsec.SparseLinear(256, 512, spec=spec, device="cuda", dtype=torch.float16)
            rows = tune_model(layer, [64], progress=False)
            print(summary(rows, torch.cuda.get_device_name()))
            for _, program, _, result, _ in rows:
                status = {o.strategy: o.status for o in result.outcomes}
                assert result.chosen is not None, (spec, program, status)
                # configurations were timed, not only listed (a GPU whose compiles all fail would list them pruned)
                assert any(n.startswith("triton[") and v in ("chosen", "timed") for n, v in status.items()), status
                assert "wrong" not in status.values(), status
                if spec == "2:4" and program == "forward" and torch.cuda.get_device_capability() >= (8, 0):
                    assert status["semi-structured"] in ("chosen", "timed"), status
            x = torch.randn(64, 256, device="cuda", dtype=torch.float16, requires_grad=True)
            with config.patch(backend="auto"):
                y = layer(x)
                y.float().square().sum().backward()
            w = layer.dense_weight().double()
            assert_kernel_close(y, x.double() @ w.t() + layer.bias.double(), torch.float16, f"{spec} tuned forward")
            dy = 2 * y.detach().double()
            assert_kernel_close(x.grad, dy @ w, torch.float16, f"{spec} tuned dX")
            dv = layer.layout.values_from_dense(dy.t() @ x.detach().double(), layer.positions())
            assert_kernel_close(layer.values.grad, dv.view(layer.values.shape), torch.float16, f"{spec} tuned dV")
            key = ops._key(layer.values, *layer.layout.op_key)
            for program in ("forward", "grad_input", "grad_values"):
                assert explain_choice(program, key, "triton", layer.values, 64)[1] == "exact entry", (spec, program)
            entries = TuneCache(device_of(layer.values)).entries()
            assert sum(1 for k in entries if str(layer.layout.op_key.spec) in k) >= 3, entries.keys()
            print("ok tuner", spec)


def export() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    sparsec.sparsify(model, spec="2:4", policy="static")
    model = model.cuda().half()
    out = sparsec.export(model, "semi_structured")
    assert type(out[0].weight).__name__.startswith("SparseSemiStructured"), type(out[0].weight)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want, got = model(x).float(), out(x).float()
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2), (got - want).abs().max()
    print("ok export semi_structured")


CHECKS = {
    "export": export,
    "kernels": kernels,
    "rigl": rigl,
    "autocast": autocast,
    "second_device": second_device,
    "cuda_graphs": cuda_graphs,
    "tuner": tuner,
}

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") in (None, "", "0"), "run without TRITON_INTERPRET: a GPU check"
    CHECKS[sys.argv[1]](*sys.argv[2:])
