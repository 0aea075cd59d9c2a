"""small_dense: the RigL paper's baseline, a narrower dense model with the sparse model's weight budget."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from sparsec.errors import SparsecError
from sparsec.formats import make_layout
from sparsec.policies.base import Policy, Replace
from sparsec.spec import Dense, Spec


@dataclass(frozen=True)
class SmallDense(Policy):
    """The baseline of the RigL paper: a dense model with as many weights as the sparse one would keep.

    ``sparsify(model, spec, policy=small_dense)`` shrinks the hidden widths of an ``nn.Sequential``
    chain of Linear/Conv2d layers (the input and output widths stay) by one factor, the largest whose
    dense weights fit the sparse model's kept-weight budget, and re-initialises the layers.
    """

    name: ClassVar[str] = "small_dense"

    def prepare(
        self, model: nn.Module, targets: Mapping[str, nn.Module], specs: Mapping[str, Spec], replace: Replace
    ) -> nn.Module:
        """No sparse layers: the chain narrowed to the budget (``shrink_to_budget``)."""
        return shrink_to_budget(model, targets, specs)


small_dense = SmallDense()


def shrink_to_budget(model: nn.Module, targets: Mapping[str, nn.Module], specs: Mapping[str, Spec]) -> nn.Module:
    """Narrow the hidden widths of a Sequential chain until its weights fit the budget."""
    if not isinstance(model, nn.Sequential) or any(
        p.numel() and not isinstance(m, (nn.Linear, nn.Conv2d))
        for m in model.children()
        for p in m.parameters(recurse=False)
    ):
        raise SparsecError(
            "small_dense narrows hidden widths, which is defined here for an nn.Sequential chain of Linear/"
            "Conv2d layers (and parameter-free modules); build the small dense model by hand for other models"
        )
    layers = [(i, m) for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d))]
    budget = 0
    for name, module in targets.items():
        w = module.weight
        budget += (
            w.numel() if isinstance(specs[name], Dense) else make_layout(specs[name], w.shape[0], w[0].numel()).nnz
        )

    def widths(scale: float) -> list[int]:  # output width of each layer; the last keeps its own
        return [max(1, round(_out(m) * scale)) for _, m in layers[:-1]] + [_out(layers[-1][1])]

    def weights(scale: float) -> int:
        outs, total, prev = widths(scale), 0, None
        for (_, m), out in zip(layers, outs, strict=True):
            total += out * _fan_in(m, prev)
            prev = (out, _out(m))
        return total

    lo, hi = 0.0, 1.0
    for _ in range(50):  # bisection on the width factor
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if weights(mid) <= budget else (lo, mid)
    prev = None
    for (i, m), out in zip(layers, widths(lo), strict=True):
        model[i] = _resized(m, _fan_in(m, prev) // _kernel(m), out)
        prev = (out, _out(m))
    return model


def _out(m) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _kernel(m) -> int:
    return 1 if isinstance(m, nn.Linear) else m.kernel_size[0] * m.kernel_size[1]


def _fan_in(m, prev) -> int:
    """Inputs per output after the previous layer went from ``prev[1]`` to ``prev[0]`` outputs."""
    full = m.in_features if isinstance(m, nn.Linear) else m.in_channels * _kernel(m)
    if prev is None:
        return full
    new, old = prev
    return full * new // old  # a Linear after Flatten sees every channel's positions


def _resized(m, fan_in: int, out: int):
    if isinstance(m, nn.Linear):
        return nn.Linear(fan_in, out, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    return nn.Conv2d(
        fan_in,
        out,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        bias=m.bias is not None,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )
