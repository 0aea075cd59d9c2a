"""Apply a ``Change`` to a layer and its optimizer state in one call; keep optimizer state aligned.

Every per-element state tensor of a values parameter (SGD ``momentum_buffer``, Adam/AdamW
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...) is recognised by having the parameter's
shape and is permuted like the values: surviving items keep their state, grown items start at 0.
Scalar state (Adam's ``step``) is left alone.
"""

from __future__ import annotations

import torch

from sparsec.nn import sharded
from sparsec.nn.layers import SparseLayer, remap_items
from sparsec.policies.base import Change


@torch.no_grad()
def apply_change(layer: SparseLayer, optimizer: torch.optim.Optimizer | None, change: Change) -> None:
    """Move ``layer`` (values, index buffers, storage) and its optimizer state to ``change``.

    Where the values move in place, a gradient they still hold is the last step's, spent by the optimizer
    step before the update and laid out by the old slots: it goes (as ``zero_grad()`` would) before the new
    arrays are made."""
    if change.flat is None:  # same counts: only the recorded spec moves on
        layer.set_spec(change.spec)
    elif change.spec is None:  # same layout: values move in place, the Parameter stays
        layer.layout.check_positions(change.flat, what="updated mask")  # exact counts per unit, every time
        layer.values.grad = None
        remap_optimizer_state(optimizer, layer.values, change.src)
        layer.set_positions(change.flat, change.src)
    else:  # new storage: a new values Parameter, the optimizer pointed at it
        old = layer.set_layout(change.spec, change.flat, change.src)
        replace_parameter(optimizer, old, layer.values, change.src)


@torch.no_grad()
def replace_parameter(optimizer, old: torch.Tensor, new: torch.Tensor, src: torch.Tensor | None) -> None:
    """Point ``optimizer`` at ``new`` instead of ``old``, its per-element state following ``src``
    (``None``: the state moves as it is, e.g. loaded from a checkpoint with ``new``'s shapes)."""
    if optimizer is None:
        return
    if src is not None:
        remap_optimizer_state(optimizer, old, src, new.shape)
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        optimizer.state[new] = optimizer.state.pop(old)


@torch.no_grad()
def remap_optimizer_state(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, src: torch.Tensor, new_shape=None
) -> None:
    """Call before the values change: per-element state of ``param`` follows ``src`` into ``new_shape``."""
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    shape = tuple(param.shape) if new_shape is None else tuple(new_shape)
    for key, value in list(state.items()):
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            state[key] = sharded.like(value, remap_items(sharded.whole(value), src, shape))
