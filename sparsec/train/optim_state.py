"""Keep optimizer state aligned with compressed values when a mask update moves them.

Every per-element state tensor of a values parameter (SGD ``momentum_buffer``, Adam/AdamW
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...) is recognised by having the parameter's
shape and is permuted like the values: surviving items keep their state, grown items start at 0.
Scalar state (Adam's ``step``) is left alone.
"""

from __future__ import annotations

import torch

from sparsec.nn.layers import remap_rows


@torch.no_grad()
def remap_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, src: torch.Tensor) -> None:
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.copy_(remap_rows(value, src))
