"""Storage formats: how a spec's kept weights are laid out, indexed and checked (pure data over torch)."""

from sparsec.formats.layout import Layout, item_scores, make_layout

__all__ = ["Layout", "item_scores", "make_layout"]
