"""static: the mask chosen at initialisation never changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsec.policies.base import Policy


@dataclass(frozen=True)
class Static(Policy):
    """The mask chosen at initialisation never changes (the protocol's defaults)."""

    name: ClassVar[str] = "static"


static = Static()
