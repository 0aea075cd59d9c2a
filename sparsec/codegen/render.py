"""Render kernel source from a Jinja template in ``sparsec.kernels`` (the repository's ``kernels/``).

Rendering is deterministic: sorted parameters, a header naming template, spec, dtype and IR key,
no timestamps; identical inputs give byte-identical source, so Triton's own cache hits too.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import jinja2

from sparsec.errors import SparsecError


@functools.cache
def templates_dir():
    """The installed ``sparsec.kernels`` package, or ``kernels/`` beside ``sparsec/`` in a source checkout
    (where ``python -m pytest`` imports ``sparsec`` from the working tree, not through the install)."""
    try:
        return resources.files("sparsec.kernels")
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parents[2] / "kernels"
        if checkout.is_dir():
            return checkout
        raise SparsecError("sparsec.kernels (the Triton templates) is not installed; reinstall sparsec") from None


def _load(name: str) -> str:
    path = templates_dir().joinpath(name)
    if not path.is_file():
        raise SparsecError(f"kernel template {name!r} is missing from sparsec.kernels (a broken install?)")
    return path.read_text()


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        undefined=jinja2.StrictUndefined,  # a missing parameter is an error, never an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **params) -> str:
    """Source of ``template`` rendered with ``params`` (plus ``template`` itself for the header)."""
    params = dict(sorted(params.items()))
    params.setdefault("dot_args", "")  # the tile pass's precision: ', input_precision="ieee"' or Triton's default
    return _environment().get_template(template).render(template=template, **params)
