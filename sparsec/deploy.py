"""``sparsec.export`` (module ``sparsec.deploy``): a trained model's copy for inference, its sparse layers in a
format deployment runs.

- ``"dense"``: ``nn.Linear`` / ``nn.Conv2d`` with zeros where nothing is kept (any runtime, ONNX, torch.export);
- ``"csr"``: linear layers as ``SparseCSRLinear``, the weight a ``torch.sparse_csr`` tensor (``torch.sparse.mm``);
- ``"bsr"``: linear layers of block specs as ``SparseBSRLinear``, a ``torch.sparse_bsr`` weight of the spec's
  blocks;
- ``"condensed"``: linear layers whose rows keep equal counts (fan-in, N:M; rows SRigL ablated keep none) as
  ``CondensedLinear``: values ``[rows, k]`` and 16-bit input indices (32-bit past 32767 inputs), the SRigL
  paper's deployment form;
- ``"semi_structured"``: 2:4 linear layers on CUDA as ``nn.Linear`` with PyTorch's semi-structured weight
  (``torch.sparse.to_sparse_semi_structured``: the sparse tensor cores), in fp16 or bf16.

The model passed in is left as it is; the copy shares nothing with it. A condensed layer computes only the
outputs SRigL left active; where the next layer of an ``nn.Sequential`` follows past elementwise modules,
the ablated outputs are removed altogether (``compact_ablated``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.nn import sharded
from sparsec.nn.layers import SparseConv2d, SparseLayer, SparseLinear
from sparsec.spec import NM, Block

FORMATS = ("dense", "csr", "bsr", "condensed", "semi_structured")


class SparseCSRLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` a ``torch.sparse_csr`` tensor (rows: outputs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.weight.layout}"


class SparseBSRLinear(SparseCSRLinear):
    """``y = x @ W^T + b`` with ``W`` a ``torch.sparse_bsr`` tensor of the spec's blocks."""


class CondensedLinear(nn.Module):
    """``y[:, o] = sum_j values[o, j] * x[:, indices[o, j]] + b[o]``: every output reads its ``k`` kept inputs
    (constant fan-in), one gather and one reduction. ``outputs``: where SRigL ablated some outputs (no kept
    weights), the outputs the rows compute; the others are the bias alone and cost nothing (None: every
    output has a row)."""

    def __init__(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        in_features: int,
        bias: torch.Tensor | None,
        outputs: torch.Tensor | None = None,
        out_features: int | None = None,
    ):
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("indices", indices)  # int16 (int32 past 32767 inputs)
        self.register_buffer("bias", bias)  # [out_features]
        self.register_buffer("outputs", outputs)
        self.in_features = in_features
        self.out_features = values.shape[0] if out_features is None else out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        gathered = flat[:, self.indices.long()]  # [B, rows, k]
        y = (gathered * self.values).sum(-1)
        if self.outputs is not None:  # ablated outputs: nothing computed, zero before the bias
            y = y.new_zeros(y.shape[0], self.out_features).index_copy(1, self.outputs, y)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        ablated = "" if self.outputs is None else f", computed_outputs={self.outputs.numel()}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.values.shape[1]}{ablated}"
        )


# Modules that act on each feature alone and hold nothing per feature: an ablated output's constant passes
# through them to the next layer, which can then take it in its bias (compact_ablated)
_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout)


def export(model: nn.Module, format: str = "dense") -> nn.Module:  # noqa: A002 - the issue's and torch's word
    """A copy of ``model`` whose sparse layers are in ``format`` (``FORMATS``), for inference: the same
    outputs as the trained model (fp32: within float rounding of the summation order)."""
    if format not in FORMATS:
        raise SparsecError(f"export format {format!r}; choose one of {', '.join(FORMATS)}")
    if any(isinstance(m, SparseLayer) and sharded.is_sharded(m.values) for m in model.modules()):
        raise SparsecError(
            "export reads whole layers, and FSDP2 (fully_shard) holds this model's values sharded; load a full "
            "state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True))) into an unsharded copy and export that"
        )
    out = copy.deepcopy(model)
    if isinstance(out, SparseLayer):
        return _exported(out, format, "the model")
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SparseLayer):
                setattr(module, child_name, _exported(child, format, f"{name}.{child_name}".lstrip(".")))
    for module in out.modules():
        if isinstance(module, nn.Sequential):
            compact_ablated(module)
    return out


@torch.no_grad()
def compact_ablated(seq: nn.Sequential) -> None:
    """Remove the ablated outputs of each ``CondensedLinear`` of ``seq`` whose next layer, past elementwise
    modules only, is an ``nn.Linear`` or a ``CondensedLinear``: such an output is a constant (its bias
    through those modules), which the next layer takes into its bias, and it no longer reads that input.
    The outputs are the same; the layers shrink to the computed outputs."""
    mods = list(seq)
    for i, layer in enumerate(mods):
        if not isinstance(layer, CondensedLinear) or layer.outputs is None:
            continue
        j = i + 1
        while j < len(mods) and isinstance(mods[j], _ELEMENTWISE):
            j += 1
        if j == len(mods) or not isinstance(mods[j], (nn.Linear, CondensedLinear)):
            continue
        const = layer.bias.clone() if layer.bias is not None else layer.values.new_zeros(layer.out_features)
        for between in mods[i + 1 : j]:
            const = const if isinstance(between, nn.Dropout) else between(const)  # dropout: identity at inference
        keep = layer.outputs
        gone = torch.ones(layer.out_features, dtype=torch.bool, device=keep.device)
        gone[keep] = False
        _take_constant_inputs(mods[j], const, gone, keep)
        layer.bias = None if layer.bias is None else layer.bias[keep].clone()
        layer.outputs, layer.out_features = None, keep.numel()


def _take_constant_inputs(nxt: nn.Module, const: torch.Tensor, gone: torch.Tensor, keep: torch.Tensor) -> None:
    """``nxt`` reads only the ``keep`` inputs from now on; the ``gone`` ones, constant ``const``, go into its
    bias."""
    if isinstance(nxt, nn.Linear):
        shift = nxt.weight[:, gone] @ const[gone]
        nxt.weight = nn.Parameter(nxt.weight[:, keep].clone(), requires_grad=nxt.weight.requires_grad)
        nxt.in_features = keep.numel()
    else:  # a condensed row keeps its k entries: one on a gone input reads input 0 with weight 0
        idx = nxt.indices.long()
        on_gone = gone[idx]
        shift = (nxt.values * const[idx] * on_gone).sum(1)
        if nxt.outputs is not None:  # its own ablated outputs: the shift lands on the computed ones
            shift = shift.new_zeros(nxt.out_features).index_copy(0, nxt.outputs, shift)
        renumber = torch.full_like(gone, 0, dtype=torch.int64).index_copy(
            0, keep, torch.arange(keep.numel(), device=keep.device)
        )
        nxt.values = torch.where(on_gone, torch.zeros_like(nxt.values), nxt.values)
        nxt.indices = torch.where(on_gone, 0, renumber[idx]).to(nxt.indices.dtype)
        nxt.in_features = keep.numel()
    if nxt.bias is None:
        nxt.bias = shift if isinstance(nxt, CondensedLinear) else nn.Parameter(shift, requires_grad=False)
    else:
        nxt.bias.data.add_(shift)


@torch.no_grad()
def _exported(layer: SparseLayer, format: str, where: str) -> nn.Module:  # noqa: A002
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if isinstance(layer, SparseConv2d):
        if format != "dense":
            raise SparsecError(f"{where}: a sparse conv exports as format='dense' (torch's sparse layouts are 2-D)")
        weight = layer.dense_weight()
        conv = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            bias=bias is not None, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
        return conv
    if not isinstance(layer, SparseLinear):
        raise SparsecError(f"{where}: {type(layer).__name__} has no export")
    if format == "semi_structured":
        return _semi_structured(layer, bias, where)
    if format == "dense":
        return _dense_linear(layer.dense_weight(), bias)
    if format in ("csr", "bsr") and not layer.values.is_cuda and layer.values.dtype in (torch.float16, torch.bfloat16):
        raise SparsecError(
            f"{where}: format={format!r} runs torch.sparse.mm, which has no {layer.values.dtype} kernel off CUDA; "
            f"export a float32 copy (model.float()), or format 'dense' or 'condensed'"
        )
    if format == "csr":  # the sparse formats build from the kept values alone: no dense weight
        return SparseCSRLinear(_csr(layer), bias)
    if format == "condensed":
        return _condensed(layer, bias, where)
    if not isinstance(layer.spec, Block):
        raise SparsecError(f"{where}: format='bsr' needs a block spec, this layer is {layer.spec}; use 'csr'")
    return SparseBSRLinear(_bsr(layer), bias)


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def _semi_structured(layer: SparseLayer, bias: torch.Tensor | None, where: str) -> nn.Linear:
    if layer.spec != NM(2, 4):
        raise SparsecError(f"{where}: format='semi_structured' is PyTorch's 2:4 layout; this layer is {layer.spec}")
    weight = layer.values
    if not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
        raise SparsecError(
            f"{where}: format='semi_structured' runs on CUDA in fp16 or bf16 (the sparse tensor cores); the layer "
            f"is {weight.dtype} on {weight.device}: call model.cuda().half() first, or export 'dense' or 'condensed'"
        )
    linear = _dense_linear(layer.dense_weight(), bias)
    linear.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
    return linear


def _condensed(layer: SparseLayer, bias: torch.Tensor | None, where: str) -> CondensedLinear:
    layout = layer.layout
    flat = layout.element_positions(layer.positions())
    order = flat.argsort()
    flat, values = flat[order], layer.values.detach().reshape(-1)[order]
    per_row = torch.bincount(flat // layout.in_features, minlength=layout.out_features)
    computed = per_row > 0  # srigl's ablated outputs keep nothing
    k = int(per_row.max()) if per_row.numel() else 0
    if not bool((per_row[computed] == k).all()):
        raise SparsecError(
            f"{where}: format='condensed' needs the same kept count in every row (a fanin or N:M spec; rows "
            f"SRigL ablated keep none and are left out); this layer is {layer.spec}: use 'csr'"
        )
    rows = int(computed.sum())
    if rows == 0:
        raise SparsecError(f"{where}: every output keeps nothing (the layer is its bias); use 'dense' or 'csr'")
    index_dtype = torch.int16 if layout.in_features <= 2**15 - 1 else torch.int32
    indices = (flat % layout.in_features).view(rows, k).to(index_dtype)
    outputs = None if rows == layout.out_features else computed.nonzero().flatten()
    return CondensedLinear(
        values.view(rows, k).clone(), indices, layout.in_features, bias, outputs, layout.out_features
    )


def _csr(layer: SparseLayer) -> torch.Tensor:
    """The layer's kept weights as a CSR tensor: its mask exactly (a kept weight trained to 0 stays in it)."""
    layout = layer.layout
    flat = layout.element_positions(layer.positions())  # weight positions in value order
    order = flat.argsort()
    flat, values = flat[order], layer.values.detach().reshape(-1)[order].clone()
    crow = torch.searchsorted(flat, torch.arange(layout.out_features + 1, device=flat.device) * layout.in_features)
    shape = (layout.out_features, layout.in_features)
    return torch.sparse_csr_tensor(crow, flat % layout.in_features, values, shape)


def _bsr(layer: SparseLayer) -> torch.Tensor:
    """A block layer's kept blocks as a BSR tensor of its blocks (stored in block-grid order, as the layer)."""
    layout = layer.layout
    blocks = layer.positions()  # sorted block positions on the block grid
    n_rows, n_cols = layout.grid
    crow = torch.searchsorted(blocks, torch.arange(n_rows + 1, device=blocks.device) * n_cols)
    values = layer.values.detach().reshape(-1, *layout.item).clone()
    shape = (layout.out_features, layout.in_features)
    return torch.sparse_bsr_tensor(crow, blocks % n_cols, values, shape)
