import pytest
import torch
from helpers import SPECS_AND_SHAPES, assert_close
from torch import nn

import sparsec
from sparsec import ShapeError, SparsecError, SparseConv2d, SparseLinear


def _reference_linear(layer: SparseLinear, x: torch.Tensor, dy: torch.Tensor):
    """Dense-masked float64 reference: output, dX, dW at kept positions, d(bias)."""
    w = layer.dense_weight().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_() if layer.bias is not None else None
    xd = x.detach().double().requires_grad_()
    y = xd @ w.t() + (b if b is not None else 0)
    y.backward(dy.double())
    return y, xd.grad, w.grad[layer.mask()], (b.grad if b is not None else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
def test_linear_forward_and_gradients_match_float64_reference(spec, out, inn, bias, dtype):
    layer = SparseLinear(inn, out, bias=bias, spec=spec, dtype=dtype)
    x = torch.randn(3, 5, inn, dtype=dtype, requires_grad=True)  # leading dims are flattened
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = _reference_linear(layer, x.reshape(-1, inn), dy.reshape(-1, out))
    assert_close(y.reshape(-1, out), y_ref, dtype, "forward")
    assert_close(x.grad.reshape(-1, inn), dx_ref, dtype, "grad input")
    # values are stored item after item in ascending flat order; the dense mask reads row-major,
    # which differs from stored order only for blocks: compare through dense views.
    dvalues_dense = layer.layout.to_dense(layer.values.grad, layer.positions())
    assert_close(dvalues_dense[layer.mask()], dw_ref, dtype, "grad values")
    if bias:
        assert_close(layer.bias.grad, db_ref, dtype, "grad bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", ["85%", "2:4", "block(4x9, 50%)", "fanin(k=7)"])
def test_conv_matches_masked_dense_conv(spec, dtype):
    conv = nn.Conv2d(4, 8, kernel_size=3, stride=2, padding=1, dilation=1, dtype=dtype)  # fan-in 36
    layer = SparseConv2d.from_dense(conv, spec)
    x = torch.randn(2, 4, 9, 7, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = layer.dense_weight().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    y_ref = nn.functional.conv2d(xd, w, b, stride=2, padding=1)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, "conv forward")
    assert_close(x.grad, xd.grad, dtype, "conv grad input")
    dvalues_dense = layer.layout.to_dense(layer.values.grad, layer.positions()).view_as(w)
    assert_close(dvalues_dense[layer.mask()], w.grad[layer.mask()], dtype, "conv grad values")
    assert_close(layer.bias.grad, b.grad, dtype, "conv grad bias")
    # the sparse layer starts from the dense conv's values at its kept positions
    assert torch.equal(layer.dense_weight(), conv.weight.detach() * layer.mask())


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
def test_storage_is_compressed_and_invariants_hold(spec, out, inn):
    layer = SparseLinear(inn, out, spec=spec)
    layout = layer.layout
    for tensor in [*layer.parameters(), *layer.buffers()]:
        assert tensor.numel() < out * inn or tensor.numel() == layout.nnz < out * inn, tensor.shape
    assert tuple(layer.values.shape) == layout.values_shape
    mask = layer.mask()
    assert int(mask.sum()) == layout.nnz
    if isinstance(layer.spec, sparsec.NM):
        groups = mask.view(out, -1, layer.spec.m).sum(-1)
        assert bool((groups == layer.spec.n).all())
    if isinstance(layer.spec, sparsec.FanIn):
        assert bool((mask.sum(1) == layout.kept_per_unit).all())
    if isinstance(layer.spec, sparsec.Block):
        bh, bw = layout.item
        blocks = mask.view(out // bh, bh, inn // bw, bw)
        assert bool((blocks.all(dim=(1, 3)) == blocks.any(dim=(1, 3))).all())


def test_state_dict_round_trip_and_dense_loading():
    dense = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    sparse = sparsec.sparsify(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)), spec="2:4")
    sparse.load_state_dict(dense.state_dict())  # the dense model's values at the sparse mask
    for i in (0, 2):
        assert torch.equal(sparse[i].dense_weight(), dense[i].weight.detach() * sparse[i].mask())
        assert torch.equal(sparse[i].bias, dense[i].bias)
    copy = sparsec.sparsify(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)), spec="2:4")
    copy.load_state_dict(sparse.state_dict())
    for i in (0, 2):
        assert torch.equal(copy[i].mask(), sparse[i].mask())
        assert torch.equal(copy[i].values, sparse[i].values)
    x = torch.randn(3, 16)
    assert torch.equal(copy(x), sparse(x))
    with pytest.raises(ShapeError, match=r"0.weight has shape \(12, 15\)"):
        sparse.load_state_dict({**dense.state_dict(), "0.weight": torch.zeros(12, 15)})


def test_bad_inputs_get_clear_errors():
    layer = SparseLinear(8, 4, spec="50%")
    with pytest.raises(ShapeError, match="input has 7 features .* takes 8"):
        layer(torch.randn(2, 7))
    with pytest.raises(SparsecError, match=r"input dtype torch.float64 does not match .* layer.to\(torch.float64\)"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(SparsecError, match="spec 'dense' keeps a layer dense"):
        SparseLinear(8, 4, spec="dense")
    conv = SparseConv2d(3, 4, 3, spec="50%")
    with pytest.raises(ShapeError, match=r"takes \[N, 3, H, W\]"):
        conv(torch.randn(2, 4, 5, 5))
    with pytest.raises(ShapeError, match="groups=1"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), "50%", name="dw")
    with pytest.raises(ShapeError, match="padding='same'"):
        SparseConv2d(3, 4, 3, padding="same")


def test_sparsifying_a_sparse_model_again_names_its_sparse_layers():
    model = sparsec.sparsify(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), spec="50%", dense=["2"])
    with pytest.raises(
        sparsec.SparsecError, match=r"already sparse: \['0'\] .* dense Linear/Conv2d layers are \['2'\]"
    ):
        sparsec.sparsify(model, spec="50%")
    whole = sparsec.sparsify(nn.Sequential(nn.Linear(4, 4)), spec="50%")
    with pytest.raises(sparsec.SparsecError, match=r"already sparse: \['0'\].*overrides=.*dense="):
        sparsec.sparsify(whole, spec="50%")


@pytest.mark.parametrize("spec", ["90%", "fanin(k=3)"])
def test_a_checkpoint_whose_index_buffers_break_the_spec_is_refused_by_name(spec):
    layer = SparseLinear(20, 6, spec=spec)
    state = layer.state_dict()
    cols = next(k for k in state if k.endswith("indices"))  # csr: col_indices; fan-in: fanin_indices
    broken = state[cols].clone().view(-1)
    broken[[0, 1]] = broken[[1, 0]]  # two columns of the first row swapped: not ascending
    state[cols] = broken.view(state[cols].shape)
    fresh = SparseLinear(20, 6, spec=spec)
    with pytest.raises(ShapeError, match="the checkpoint's layer mask positions are not strictly increasing"):
        fresh.load_state_dict(state)
    fresh.load_state_dict(layer.state_dict())  # the checkpoint as saved loads
    assert torch.equal(fresh.mask(), layer.mask())
