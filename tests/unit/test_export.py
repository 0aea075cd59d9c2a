"""sparsec.export: the exported copy gives the trained sparse model's outputs (fp32: 1e-5 relative), keeps
the mask exactly (a kept weight that is 0 stays in a CSR/BSR pattern), leaves the model as it was, and
refuses what a format cannot hold with the fix."""

import pytest
import torch
from torch import nn

import sparsec
from sparsec.deploy import CondensedLinear, SparseBSRLinear, SparseCSRLinear

SPECS = ["90%", "2:4", "block(4x4, 75%)", "fanin(75%)"]


def _trained(spec: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    sparsec.sparsify(model, spec=spec, policy=sparsec.rigl(delta_t=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    for _ in range(5):  # a few steps and updates: values and masks moved from their initial ones
        model(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
        updater.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("fmt", ["dense", "csr", "bsr", "condensed"])
def test_the_exported_model_gives_the_trained_model_s_outputs(spec, fmt):
    model = _trained(spec)
    if fmt == "bsr" and not spec.startswith("block"):
        with pytest.raises(sparsec.SparsecError, match="needs a block spec"):
            sparsec.export(model, fmt)
        return
    if fmt == "condensed" and spec not in ("2:4", "fanin(75%)"):  # rows of unequal kept counts
        with pytest.raises(sparsec.SparsecError, match="same kept count in every row"):
            sparsec.export(model, fmt)
        return
    out = sparsec.export(model, fmt)
    kinds = {"dense": nn.Linear, "csr": SparseCSRLinear, "bsr": SparseBSRLinear, "condensed": CondensedLinear}
    assert all(isinstance(out[i], kinds[fmt]) for i in (0, 2))
    x = torch.randn(5, 3, 32)  # leading dimensions pass through
    with torch.no_grad():
        want, got = model(x), out(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert isinstance(model[0], sparsec.SparseLinear)  # the trained model is left as it was


def test_the_exported_pattern_is_the_mask_even_where_a_kept_weight_is_zero():
    model = _trained("90%")
    layer = model[0]
    with torch.no_grad():
        layer.values[:3] = 0.0
    weight = sparsec.export(model, "csr")[0].weight
    assert weight.layout == torch.sparse_csr and weight.values().numel() == layer.layout.nnz
    rows = torch.repeat_interleave(torch.arange(64), weight.crow_indices().diff())
    assert torch.equal(rows * 32 + weight.col_indices(), layer.positions())  # the zeros' positions too
    assert int((weight.values() == 0).sum()) >= 3 and torch.equal(weight.to_dense(), layer.dense_weight())


def test_a_sparse_conv_exports_dense_and_refuses_torch_s_sparse_layouts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    sparsec.sparsify(model, spec="75%")
    out = sparsec.export(model, "dense")
    assert isinstance(out[0], nn.Conv2d)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(sparsec.SparsecError, match="format='dense'"):
        sparsec.export(model, "csr")


def test_a_condensed_layer_holds_16_bit_indices_and_its_fan_in_values():
    layer = sparsec.export(_trained("fanin(75%)"), "condensed")[0]
    assert layer.indices.dtype == torch.int16 and tuple(layer.values.shape) == (64, 8)  # 25% of 32 inputs


def test_semi_structured_is_refused_off_cuda_and_off_2_4_with_the_fix():
    with pytest.raises(sparsec.SparsecError, match=r"on CUDA in fp16 or bf16.*model.cuda\(\).half\(\)"):
        sparsec.export(_trained("2:4"), "semi_structured")
    with pytest.raises(sparsec.SparsecError, match="PyTorch's 2:4 layout"):
        sparsec.export(_trained("90%"), "semi_structured")


def test_an_unknown_format_is_refused_with_the_choices():
    with pytest.raises(sparsec.SparsecError, match="dense, csr, bsr, condensed, semi_structured"):
        sparsec.export(_trained("90%"), "onnx")


def test_the_dense_export_runs_under_torch_export():
    out = sparsec.export(_trained("2:4"), "dense")
    program = torch.export.export(out, (torch.randn(4, 32),))
    x = torch.randn(4, 32)
    assert torch.allclose(program.module()(x), out(x))
