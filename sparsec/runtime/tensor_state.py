"""Per-process state hung on a layer's index buffers (its index plans, its grow tap).

It lives in the tensor's ``__dict__``, so it belongs to the layer's storage and dies with it. A pickle
(``torch.save(model)``) or a deep copy of the tensor carries none of it: plans hold weak references and
device-specific arrays, rebuilt by the copy at its first call, and a grow tap feeds the live layer's
MaskUpdater, which a copy does not have.
"""

from __future__ import annotations

import torch


class TensorState(dict):
    """A dict that a pickle or ``copy.deepcopy`` of its tensor recreates empty."""

    def __reduce__(self):
        return (TensorState, ())


def tensor_state(anchor: torch.Tensor, attr: str) -> TensorState:
    """``anchor``'s state under ``attr``, created empty on first use."""
    state = anchor.__dict__.get(attr)
    if state is None:
        state = TensorState()
        setattr(anchor, attr, state)
    return state
