"""Update steps run the generated kernels (issue 10): on the interpret backend an armed RigL step and an
SNFS step call no torch.sparse op, in fp16 and bf16 too (the old eager armed path ran PyTorch's CSR kernels,
whose CUDA sampled_addmm has no half types)."""

import pytest
import torch
from torch import nn

import sparsec
from sparsec import config


@pytest.fixture
def no_torch_sparse(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a torch.sparse op ran on the interpret backend")

    for target, name in ((torch.sparse, "mm"), (torch.sparse, "sampled_addmm"), (torch, "sparse_csr_tensor")):
        monkeypatch.setattr(target, name, refuse)


def _train(model, dtype, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 24, generator=g).to(dtype), torch.randint(0, 4, (16,), generator=g)
    grown = 0
    with config.patch(backend="interpret"):
        for _ in range(steps):
            nn.functional.cross_entropy(model(x).float(), y).backward()
            opt.step()
            grown += sum(updater.step().values())
            opt.zero_grad()
    return grown


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_armed_rigl_steps_call_no_torch_sparse_op(no_torch_sparse, dtype):
    # fp32 and fp16 only: Triton 3.8's interpreter computes bf16 tl.dot wrongly (tests/interpret/test_kernels.py)
    torch.manual_seed(0)
    model = nn.Sequential(
        sparsec.SparseLinear(24, 16, spec="90%", policy=sparsec.rigl(delta_t=2), dtype=dtype),
        nn.ReLU(),
        sparsec.SparseLinear(16, 4, spec="fanin(k=8)", policy=sparsec.rigl(delta_t=2), dtype=dtype),
    )
    assert _train(model, dtype) > 0  # updates at steps 2 and 4 grew weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_snfs_steps_call_no_torch_sparse_op(no_torch_sparse, dtype):
    # csr layers use gathers (no tl.dot) in forward and both gradients, so bf16 is exact in the interpreter
    torch.manual_seed(0)
    model = nn.Sequential(
        sparsec.SparseLinear(24, 16, spec="80%", policy=sparsec.snfs(delta_t=2), dtype=dtype),
        nn.ReLU(),
        sparsec.SparseLinear(16, 4, spec="50%", policy=sparsec.snfs(delta_t=2), dtype=dtype),
    )
    assert _train(model, dtype) > 0


SLOW = pytest.mark.slow  # the quick tier checks one structure


@pytest.mark.parametrize(
    "spec",
    [
        "90%",
        pytest.param("2:4", marks=SLOW),
        pytest.param("block(16x16, 75%)", marks=SLOW),
        pytest.param("fanin(90%)", marks=SLOW),
    ],
)
def test_an_update_rewrites_the_kernel_plan_in_place(spec):
    """What a CUDA graph captured before an update reads (tests/gpu checks the replay itself): after a RigL
    step the plan's tensors are the same objects, holding the plan of the new mask."""
    from sparsec.runtime import plans

    torch.manual_seed(0)
    # fresh-first regrowth: the update surely moves the mask (the default may regrow what it dropped)
    layer = sparsec.SparseLinear(64, 128, spec=spec, policy=sparsec.rigl(delta_t=1, regrow_dropped=False))
    with config.patch(backend="interpret"):
        with torch.no_grad():
            layer(torch.randn(33, 64))  # as a capture would: the plan is built, its tensors recorded
        index = list(layer.index_buffers().values())
        plan = plans.held_plan(index, "interpret")
        recorded = {name: (t, t.clone()) for name, t in plan.items()}
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        updater = sparsec.MaskUpdater(layer, opt, total_steps=100)
        layer(torch.randn(33, 64)).square().sum().backward()
        opt.step()
        assert sum(updater.step().values()) > 0
    fresh = layer.layout.format.strategy(layer.layout.spec).plan(layer.layout, layer.index_buffers())
    assert any(not torch.equal(t, before) for t, before in recorded.values())  # the mask moved
    for name, (t, _) in recorded.items():
        assert plan[name] is t and torch.equal(t, fresh[name]), name
