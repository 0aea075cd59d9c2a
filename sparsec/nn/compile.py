"""What torch.compile is told about sparse layers: the storage sizes that carry kept counts are dynamic.

Dynamo takes the sizes of parameters and buffers as constants, so a layer whose kept count changes
(gmp, snfs, srigl's ablation, imp) would recompile its graph at every change, and under
``fullgraph=True`` fail hard at the recompile limit. ``declare_dynamic_storage`` adds the dims that
carry the count (``Format.count_dims``) of each layer's values and index buffers to
``torch.compiler.config.dynamic_sources`` and ``unbacked_sources``, by the layer's qualified name (no
other module's tensors change): one compiled graph serves every density. Unbacked too, because dynamo
still specialises a dynamic size at 0 and 1, and a pruned layer can keep a single item. The sizes flow
only into sparsec's custom ops, whose outputs have the dense shapes, so nothing else in the graph
becomes dynamic.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsec.nn.layers import SparseLayer


def declare_dynamic_storage(layers: Mapping[str, SparseLayer]) -> None:
    """Mark the kept-count dims of ``layers`` (qualified name in the compiled module -> layer) dynamic.

    Idempotent; a torch without ``torch.compiler.config.dynamic_sources`` recompiles once per change.
    """
    config = getattr(torch.compiler, "config", None)
    for option in ("dynamic_sources", "unbacked_sources"):
        if config is None or not hasattr(config, option):
            continue
        entries = [e for e in getattr(config, option).split(",") if e]
        for name, layer in layers.items():
            for entry in _entries(name, layer):
                if entry not in entries:
                    entries.append(entry)
        setattr(config, option, ",".join(entries))


def _escaped(name: str) -> str:
    """``name`` as a regex matching itself, with no space or comma (torch strips spaces from these options
    and splits them on commas): every character but ASCII letters, digits and ``_`` as a ``\\U`` escape."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else f"\\U{ord(c):08x}" for c in name)


def _entries(name: str, layer: SparseLayer) -> list[str]:
    # dynamo names a submodule's tensor L['self']._modules['a']._modules['b']._parameters['values']
    path = "".join(rf"\._modules\['{_escaped(part)}'\]" for part in name.split(".")) if name else ""
    root = r".*" if name else r"L\['[^']*'\]"  # a layer compiled on its own: only the root's tensors
    return [
        rf"{root}{path}\._{'parameters' if tensor == 'values' else 'buffers'}\['{tensor}'\]$:{dim}"
        for tensor, dim in layer.layout.format.count_dims.items()
    ]
