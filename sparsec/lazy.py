"""Heavy dependencies loaded at their first use, not at ``import sparsec``: ``lazy_module``.

sympy and networkx serve lowering (the IR, its passes, the explainer), not building or running a layer;
loaded eagerly they were a sixth of a training process's memory before its model (45 MB beside torch's
220 MB). The stand-in is not registered in ``sys.modules`` (``importlib.util.LazyLoader``'s module is, and
``inspect.getmodule``, which torch.library runs while registering custom ops, touches every module there,
loading them all).
"""

from __future__ import annotations

import importlib
import types


class _Deferred(types.ModuleType):
    """Stands in for module ``__name__`` until an attribute is asked for: then imports it and takes its
    namespace (later lookups are plain attribute reads)."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # copy, pickle and introspection probes: not a reason to load
            raise AttributeError(attr)
        self.__dict__.update(vars(importlib.import_module(self.__name__)))
        return object.__getattribute__(self, attr)


def lazy_module(name: str) -> types.ModuleType:
    """Module ``name``, imported at its first attribute access."""
    return _Deferred(name)
