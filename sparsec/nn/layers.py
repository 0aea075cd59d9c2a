"""Compressed sparse layers: only kept values are parameters; index buffers say where they sit.

``SparseLinear`` and ``SparseConv2d`` hold no dense weight and no dense mask. ``mask()`` and
``dense_weight()`` build them on request (tests, plots, export). A conv weight is seen as
``[out, in * kh * kw]``: one output channel's fan-in, in PyTorch's flattening order.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sparsec.errors import ShapeError, SparsecError
from sparsec.formats import Layout, make_layout
from sparsec.nn import sharded
from sparsec.runtime import (
    ops,  # also registers the custom ops torch.ops.sparsec.*
    plans,
)
from sparsec.spec import Dense, Policy, Spec, describe_spec, parse_policy, parse_spec

INITS = ("dense", "sparse")  # initial values: the dense init at the kept positions, or rescaled per kept fan-in
_FAN_IN_CHUNK = 1 << 18  # stored values rescaled at once by init='sparse': its temporaries
_REMAP_CHUNK = 1 << 18  # items moved at once by remap_items


class SparseLayer(nn.Module):
    """What SparseLinear and SparseConv2d share: storage, positions, updates, dense loading."""

    layout: Layout
    spec: Spec
    policy: Policy
    values: nn.Parameter
    bias: nn.Parameter | None

    def _init_sparse(
        self,
        spec,
        policy,
        out_features: int,
        in_features: int,
        weight: torch.Tensor | None,
        bias: bool,
        name: str,
        device=None,
        dtype=None,
        init: str | None = None,
    ) -> None:
        target = parse_spec(spec)
        if isinstance(target, Dense):
            raise SparsecError(f"{name}: spec 'dense' keeps a layer dense; use torch.nn.Linear/Conv2d instead")
        self.policy = parse_policy(policy)
        self.spec = self.policy.initial_spec(target, (out_features, in_features))  # gmp starts denser
        self.name = name
        self.target_spec = target  # where a density-changing policy (gmp) is heading
        self.layout = make_layout(self.spec, out_features, in_features, name)
        self._grow_capture = None
        # the values Parameter a checkpoint load at another density replaced (gmp): an optimizer built before
        # the load still holds it, until MaskUpdater.load_state_dict points the optimizer at the new one
        self.replaced_values: nn.Parameter | None = None
        self._cache: tuple | None = None
        init = self.policy.default_init if init is None else init
        if init not in INITS:
            raise SparsecError(f"{name}: init={init!r}; choose one of {INITS} (or None: the policy's default)")
        self.init = init
        for buf, buf_dtype, shape in self.layout.buffers:
            self.register_buffer(buf, torch.empty(shape, dtype=buf_dtype, device=device))
        if weight is not None and weight.device.type != "meta":
            dtype = dtype or weight.dtype
        self.values = nn.Parameter(torch.empty(self.layout.values_shape, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=self.values.dtype))
        else:
            self.register_parameter("bias", None)
        # On the meta device nothing is drawn: ``to_empty`` then ``reset_parameters`` materialise the layer
        self._unset = self.values.is_meta
        if not self._unset:
            self._draw(weight)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A new random topology and initial values (and bias), as a fresh layer of this spec draws them, in
        O(kept) time and memory: what ``model.to_empty(device=...)`` of a model built on the meta device
        needs next (PyTorch's convention, which nn.Linear follows)."""
        self._draw(None)

    @torch.no_grad()
    def _draw(self, weight: torch.Tensor | None) -> None:
        """Random kept positions; values from ``weight`` there, else the distribution nn.Linear / nn.Conv2d
        give their dense weight (kaiming-uniform for the dense fan-in), drawn only where kept."""
        layout, device = self.layout, self.values.device
        flat = layout.random_positions(device=device)
        self.write_positions(flat)
        bound = 1.0 / math.sqrt(layout.in_features)
        if weight is None:
            self.values.uniform_(-bound, bound)
        else:
            self.values.copy_(layout.values_from_dense(weight.detach().reshape(layout.out_features, -1), flat))
        if self.init == "sparse":
            self._rescale_for_kept_fan_in(flat)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)
        self._unset = False

    def __getstate__(self) -> dict:
        """What ``torch.save(model)`` and ``copy.deepcopy`` carry: everything but the decoded positions (weakly
        cached, decoded again on request), an armed grow capture (it feeds the live layer's MaskUpdater;
        the index buffers' plans and tap are left out with them, ``runtime.tensor_state``) and the values
        Parameter a load replaced (only the live model's optimizer may still hold it)."""
        return {**super().__getstate__(), "_cache": None, "_grow_capture": None, "replaced_values": None}

    @property
    def grow_capture(self):
        """What the values gradient hands each backward's ``dY`` and ``X`` (``capture.observe``); set by
        MaskUpdater one step before a gradient-driven grow, None otherwise."""
        return self._grow_capture

    @grow_capture.setter
    def grow_capture(self, capture) -> None:
        self.__dict__["_grow_capture"] = capture
        ops.set_tap(list(self.index_buffers().values()), capture)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)  # .to(), .cuda(), .half(): new buffer tensors
        self.grow_capture = self._grow_capture  # the capture follows them
        return out

    # --- positions -------------------------------------------------------------------------------

    def index_buffers(self) -> dict[str, torch.Tensor]:
        """The format's index buffers by name, in the layout's order (what the custom op reads)."""
        return {name: getattr(self, name) for name in self.layout.index_names}  # not .buffers: sizes change

    def _check_materialised(self) -> None:
        if self._unset:
            where = "still on the meta device" if self.values.is_meta else "moved off the meta device (to_empty)"
            raise SparsecError(
                f"{self.name} was built on the meta device and is {where}, with no positions or values yet: "
                f"call model.to_empty(device=...) and then reset_parameters() of each module (or load a "
                f"checkpoint) before using it"
            )

    def positions(self) -> torch.Tensor:
        """Sorted flat item positions (weights, or blocks for block specs) of the kept items."""
        self._check_materialised()
        named = self.index_buffers()
        bufs = list(named.values())
        # In-place writes (load_state_dict, updates) bump _version; .to() makes new buffer objects. The cache
        # names its buffers by identity (weakly), not by address: a freed address reused is a miss.
        versions = tuple(b._version for b in bufs)
        hit = self._cache is not None and self._cache[1] == versions and len(self._cache[0]) == len(bufs)
        if not (hit and all(r() is b for r, b in zip(self._cache[0], bufs, strict=True))):
            self._cache = ([weakref.ref(b) for b in bufs], versions, self.layout.decode(named))
        return self._cache[2]

    def update_positions(self) -> torch.Tensor:
        """``positions()`` as an update step holds them (its drop, grow selection and merge): on the cpp
        backend int32 where they fit and the format holds compressed rows (``Layout.decode_int32``: half the
        bytes of int64, decoded anew, not cached), else ``positions()``."""
        self._check_materialised()
        narrow = self.layout.decode_int32(self.index_buffers()) if ops.backend_for(self.values) == "cpp" else None
        return self.positions() if narrow is None else narrow

    def write_positions(self, flat: torch.Tensor) -> None:
        """Store sorted flat item positions ``flat`` (int64, or int32 where they fit; already satisfying the
        spec) in the index buffers, and the kernels' index plan with them (in place: a captured CUDA graph
        replays the new mask)."""
        named = self.index_buffers()
        for name, tensor in self.layout.encode(flat, out=named).items():
            if tensor is not named[name]:
                named[name].copy_(tensor)
        bufs = list(named.values())
        plans.refresh_plan(bufs, flat)
        # positions() decodes the buffers when asked (an update, a checkpoint): int64 positions held between
        # updates would take twice the index buffers' memory
        self._cache = None

    @torch.no_grad()
    def set_positions(self, flat: torch.Tensor, src: torch.Tensor) -> None:
        """Move to new kept positions; ``src[i]`` is the old slot of new item ``i`` or -1 (grown: 0).

        ``flat`` must already satisfy the spec (``policies.relayout.apply_change`` checks it).
        """
        self._cache = None  # the old positions are not needed again: freed before the remap allocates
        sharded.write_whole(self.values, remap_rows(self.whole_values(), src))
        self.write_positions(flat)

    def whole_values(self) -> torch.Tensor:
        """``values`` whole: itself, or, where FSDP2 (``fully_shard``) holds it sharded between forwards, every
        rank's shard gathered (``nn.sharded``: a collective, every rank calls it; updates do)."""
        return sharded.whole(self.values)

    @torch.no_grad()
    def set_layout(self, spec: Spec, flat: torch.Tensor, src: torch.Tensor) -> nn.Parameter:
        """Change density: the layout of ``spec`` with kept items ``flat``, values from old slots ``src``.

        ``values`` becomes a new Parameter (autograd caches a leaf's shape, so a resized one cannot
        keep its identity); the old one is returned so the optimizer can be pointed at the new one
        (``policies.relayout.replace_parameter``).
        """
        layout = make_layout(spec, self.layout.out_features, self.layout.in_features, self.name)
        layout.check_positions(flat, what="new mask")
        old = self.values
        self.values = nn.Parameter(remap_items(old, src, layout.values_shape), requires_grad=old.requires_grad)
        for name in [n for n, _, _ in self.layout.buffers]:
            del self._buffers[name]
        for name, dtype, shape in layout.buffers:
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=self.values.device))
        self.spec, self.layout, self._cache = spec, layout, None
        self.write_positions(flat)
        self.grow_capture = self._grow_capture  # onto the new buffers
        return old

    def set_spec(self, spec: Spec) -> None:
        """Record ``spec`` for a layer whose kept counts it leaves as they are (gmp between two sparsities
        that round to the same count). The layout stays: storage, values, positions and the kernels' key
        (a compiled graph sees no change, so it does not recompile)."""
        layout = make_layout(spec, self.layout.out_features, self.layout.in_features, self.name)
        same = (layout.values_shape, layout.buffers) == (self.layout.values_shape, self.layout.buffers)
        assert same, (spec, self.spec)
        self.spec = spec

    @torch.no_grad()
    def take_dense(self, weight: torch.Tensor, flat: torch.Tensor) -> None:
        """Keep the items ``flat`` (sorted, satisfying the spec) with their values from a dense ``weight``."""
        self.layout.check_positions(flat, what="chosen mask")
        self.write_positions(flat)
        self.values.copy_(self.layout.values_from_dense(weight.reshape(self.layout.out_features, -1), flat))
        if self.init == "sparse":
            self._rescale_for_kept_fan_in(flat)

    def get_extra_state(self) -> dict:
        # The current and target specs: a layer pruned by gmp has smaller storage than a fresh one.
        return {"spec": str(self.spec), "target_spec": str(self.target_spec)}

    def set_extra_state(self, state: dict) -> None:
        self.target_spec = parse_spec(state["target_spec"])

    # --- dense views -----------------------------------------------------------------------------

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.layout.out_features, self.layout.in_features)

    def mask(self) -> torch.Tensor:
        """Dense boolean mask in the dense weight's shape (materialised on request)."""
        ones = torch.ones(self.layout.values_shape, dtype=torch.bool, device=self.values.device)
        return self.layout.to_dense(ones, self.positions()).view(self.weight_shape)

    def _rescale_for_kept_fan_in(self, flat: torch.Tensor) -> None:
        """Each output's values times ``sqrt(dense fan-in / its kept fan-in)``, in place: a variance-scaling
        init (Kaiming, torch's default) drawn for the dense fan-in becomes the same init for the sparse one,
        as condensed-sparsity's sparse (grad-flow) initialisation and google-research/rigl's
        ``unit_scaled_init`` draw each unit for its real fan-in. O(kept), a chunk of items at a time: per
        stored value, its output row."""
        layout, values = self.layout, self.values.detach().view(-1)
        per_item = layout.item[0] * layout.item[1]
        step = max(1, _FAN_IN_CHUNK // per_item)
        chunks = [(a, min(a + step, flat.numel())) for a in range(0, flat.numel(), step)]

        def rows(a: int, b: int) -> torch.Tensor:  # output row of each stored value of items a..b
            return layout.element_positions(flat[a:b]) // layout.in_features

        kept = torch.zeros(layout.out_features, dtype=torch.int64, device=flat.device)  # kept inputs per output
        for a, b in chunks:
            kept += torch.bincount(rows(a, b), minlength=layout.out_features)
        scale = (layout.in_features / kept.clamp(min=1).to(torch.float64)).sqrt().to(values.dtype)
        for a, b in chunks:
            values[a * per_item : b * per_item] *= scale[rows(a, b)]

    def dense_weight(self) -> torch.Tensor:
        """Dense weight with zeros where nothing is kept (materialised on request)."""
        return self.layout.to_dense(self.whole_values().detach(), self.positions()).view(self.weight_shape)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d @ W^T + bias``: through the custom op ``sparsec::spmm`` wherever something traces or watches
        the call (torch.compile, export, modes, torch.func); in plain eager code the same computation
        without the op's dispatch (``runtime.ops.spmm_eager``, and for training on the cpp backend
        ``spmm_eager_training``, which hands the step's batch tiles to its backward).

        On a step armed for a grow update, the values gradient hands ``dY`` (the gradient at
        ``x2d @ W^T + bias``) and ``X`` to the armed capture (``grow_capture``); the call is the same on
        every step, so a compiled graph serves armed and unarmed steps alike.

        Under ``torch.autocast`` the layer follows ``nn.Linear``'s rule: input, values and bias compute in
        the autocast dtype (fp16 or bf16) and the gradient reaches the fp32 values through the cast.
        """
        if x2d.device != self.values.device:
            raise SparsecError(f"input on {x2d.device} but the layer on {self.values.device}; move one of them")
        if not x2d.is_meta:  # on the meta device a forward computes shapes only
            self._check_materialised()
        values, bias = self.values, self.bias
        device = x2d.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if dt in (torch.float16, torch.bfloat16):
            x2d, values = x2d.to(dt), values.to(dt)
            bias = bias.to(dt) if bias is not None else None
        if x2d.dtype != values.dtype:
            raise SparsecError(
                f"input dtype {x2d.dtype} does not match the layer's {values.dtype}; "
                f"cast the input, call layer.to({x2d.dtype}), or run under torch.autocast"
            )
        index = [getattr(self, name) for name in self.layout.index_names]  # the layout's order
        if ops.eager_call_allowed(x2d, values, bias):  # skip the op's dispatch: eager, nothing to trace
            if not ops.records_graph(x2d, values, bias):  # inference
                return ops.spmm_eager(x2d, values, bias, index, *self.layout.op_key)
            if ops.trains_eagerly(x2d, values, index, self.layout.op_key):  # the step's tiles go to its backward
                return ops.spmm_eager_training(x2d, values, bias, index, self.layout.op_key)
        return torch.ops.sparsec.spmm(x2d, values, bias, index, *self.layout.op_key)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        extra = state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())  # dense checkpoints have none
        saved = parse_spec(extra["spec"]) if extra is not None else self.spec
        dense = state_dict.get(prefix + "weight")
        if sharded.is_sharded(self.values) and (saved != self.spec or dense is not None):
            raise SparsecError(
                f"{prefix or 'the layer'}: the checkpoint holds {'a dense weight' if dense is not None else saved}, "
                f"not this FSDP2-sharded layer's {self.spec} values; load it into the model before fully_shard"
            )
        if saved != self.spec:
            # a checkpoint taken at another density (gmp): take its layout before loading the tensors
            layout = make_layout(saved, self.layout.out_features, self.layout.in_features)
            flat = layout.random_positions(device=self.values.device)[: layout.n_items]
            src = torch.zeros(layout.n_items, dtype=torch.int64, device=self.values.device)
            # an optimizer built before this load still holds the replaced Parameter:
            # MaskUpdater.load_state_dict points it at the new one
            # (kept in __dict__: assigning a Parameter attribute would register it as one)
            self.__dict__["replaced_values"] = self.set_layout(layout.spec, flat, src)
        # A dense checkpoint (`weight`) loads into the current mask: kept positions take its values.
        dense = state_dict.pop(prefix + "weight", None)
        if dense is not None:
            if tuple(dense.shape) != self.weight_shape:
                raise ShapeError(
                    f"{prefix}weight has shape {tuple(dense.shape)}, the layer's dense shape is {self.weight_shape}"
                )
            flat = self.positions()
            state_dict[prefix + "values"] = self.layout.values_from_dense(
                dense.reshape(self.layout.out_features, -1), flat
            )
            for name, tensor in self.index_buffers().items():
                state_dict.setdefault(prefix + name, tensor)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._unset = self.values.is_meta  # a checkpoint sets positions and values (to_empty, then a load)
        if not self._unset:  # loaded index buffers hold a mask the spec allows (the kernels rely on sorted rows)
            loaded = self.layout.decode(self.index_buffers())  # not positions(): its cache would hold them
            self.layout.check_positions(loaded, what=f"the checkpoint's {prefix or 'layer '}mask")
        self.grow_capture = self._grow_capture  # load_state_dict(assign=True) puts in new buffers

    def _take_bias(self, dense: nn.Module):
        """Copy a dense module's bias (``from_dense``); returns self."""
        if dense.bias is not None:
            self.bias.data.copy_(dense.bias.detach())
        return self

    def _sparse_repr(self) -> str:
        kept = f"kept={self.layout.nnz}/{math.prod(self.weight_shape)}"
        return f"spec={describe_spec(self.spec)}, policy={self.policy}, {kept}"


def remap_rows(tensor: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Items of ``tensor`` reordered by ``src`` (same count); ``src == -1`` gives zeros."""
    return remap_items(tensor, src, tensor.shape)


def remap_items(tensor: torch.Tensor, src: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of ``shape`` holding, per new item ``i``, old item ``src[i]`` of ``tensor`` (0 where -1).

    Items are what the layout keeps: single values, or ``bh x bw`` blocks; ``shape`` holds
    ``src.numel()`` of them.
    """
    item = math.prod(shape) // max(1, src.numel())
    items = tensor.detach().reshape(-1, item)
    out = items.new_empty(src.numel(), item)
    for a in range(0, src.numel(), _REMAP_CHUNK):  # a chunk at a time: the temporaries are a chunk's
        part = src[a : a + _REMAP_CHUNK]
        torch.index_select(items, 0, part.clamp(min=0), out=out[a : a + _REMAP_CHUNK])
        out[a : a + _REMAP_CHUNK].masked_fill_((part < 0)[:, None], 0)
    return out.reshape(shape)


class SparseLinear(SparseLayer):
    """``y = x @ W_sparse^T + b`` with ``W_sparse`` stored compressed in the spec's format."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        spec: str | Spec = "90%",
        policy: str | Policy = "rigl",
        weight: torch.Tensor | None = None,
        name: str = "SparseLinear",
        device=None,
        dtype=None,
        init: str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_sparse(spec, policy, out_features, in_features, weight, bias, name, device, dtype, init)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, spec, policy="rigl", name: str = "SparseLinear", init: str | None = None
    ) -> SparseLinear:
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            spec=spec,
            policy=policy,
            weight=linear.weight,
            name=name,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            init=init,
        )
        return layer._take_bias(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"input has {x.shape[-1]} features in its last dim; this layer takes {self.in_features}")
        if x.dim() == 2:  # (a reshape costs a microsecond each way: a tenth of a batch-1 product's call)
            return self._matmul(x)
        return self._matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._sparse_repr()}"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class SparseConv2d(SparseLayer):
    """2-D convolution (im2col + sparse matmul); a filter's fan-in is ``in_channels * kh * kw``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        *,
        spec: str | Spec = "90%",
        policy: str | Policy = "rigl",
        weight: torch.Tensor | None = None,
        name: str = "SparseConv2d",
        device=None,
        dtype=None,
        init: str | None = None,
    ):
        super().__init__()
        if isinstance(padding, str):
            raise ShapeError(
                f"{name}: padding={padding!r}; SparseConv2d takes integer padding (for 'same' with an "
                f"odd kernel k, use padding=k//2)"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_sparse(spec, policy, out_channels, fan_in, weight, bias, name, device, dtype, init)

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, spec, policy="rigl", name: str = "SparseConv2d", init: str | None = None
    ) -> SparseConv2d:
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ShapeError(
                f"{name}: groups={conv.groups}, padding_mode={conv.padding_mode!r}; sparse convs need "
                f"groups=1 and zero padding: keep this layer dense with dense=[{name!r}]"
            )
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
            spec=spec,
            policy=policy,
            weight=conv.weight,
            name=name,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            init=init,
        )
        return layer._take_bias(conv)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"input shape {tuple(x.shape)}; this conv takes [N, {self.in_channels}, H, W]")
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [N, K, L]
        y2d = self._matmul(cols.transpose(1, 2).reshape(n * ho * wo, -1))
        return y2d.reshape(n, ho * wo, self.out_channels).transpose(1, 2).reshape(n, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, {self._sparse_repr()}"
        )
