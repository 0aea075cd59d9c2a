"""Keep optimizer state aligned with compressed values when a mask update moves them.

Every per-element state tensor of a values parameter (SGD ``momentum_buffer``, Adam/AdamW
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...) is recognised by having the parameter's
shape and is permuted like the values: surviving items keep their state, grown items start at 0.
Scalar state (Adam's ``step``) is left alone.
"""

from __future__ import annotations

import torch

from sparsec.nn.layers import remap_items


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
            state[key] = remap_items(value, src, shape)
