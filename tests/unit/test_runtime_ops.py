"""The custom ops behind sparse layers: schema, fake kernels, autograd, torch.compile, backend choice."""

import pytest
import torch
from helpers import SPECS_AND_SHAPES
from torch import nn

import sparsec
from sparsec import SparsecError, config

FAMILIES = {"90%": "unstructured", "2:4": "2:4", "block(4x8, 50%)": "block(4x8)", "fanin(k=5)": "fanin"}


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES[::2])
def test_opcheck(spec, out, inn):
    layer = sparsec.SparseLinear(inn, out, spec=spec, dtype=torch.float64)
    index = [getattr(layer, name) for name, _, _ in layer.layout.buffers]
    x = torch.randn(5, inn, dtype=torch.float64, requires_grad=True)
    op = layer.layout.op_key
    assert op == (FAMILIES[spec], out, inn)  # typed metadata: the structure without its count, out, in
    torch.library.opcheck(torch.ops.sparsec.spmm.default, (x, layer.values, layer.bias, index, *op))
    dy = torch.randn(5, out, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparsec.spmm_grad_input.default, (dy, layer.values.detach(), index, *op))
    torch.library.opcheck(
        torch.ops.sparsec.spmm_grad_values.default, (dy, x.detach(), layer.values.detach(), index, *op)
    )


def test_torch_compile_fullgraph_two_layer_mlp_forward_and_backward():
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return sparsec.sparsify(
            nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), spec="2:4", policy=sparsec.static
        )

    eager, compiled = build(), build()
    x = torch.randn(8, 32)
    y = torch.compile(compiled, fullgraph=True)(x)
    y.square().sum().backward()
    y_ref = eager(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_backend_setting_errors():
    layer = sparsec.SparseLinear(16, 8, spec="2:4")
    x = torch.randn(2, 16)
    with config.patch(backend="triton"), pytest.raises(SparsecError, match="SPARSEC_BACKEND=triton needs CUDA tensors"):
        layer(x)
    with pytest.raises(SparsecError, match="is not a backend; choose one of auto, triton, interpret, cpu"):
        config.SETTINGS["backend"].parse("SPARSEC_BACKEND", "gpu")
    with config.patch(backend="interpret"), pytest.raises(SparsecError, match="fp16, bf16 and fp32"):
        sparsec.SparseLinear(16, 8, spec="2:4", dtype=torch.float64)(x.double())
