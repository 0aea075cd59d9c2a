"""One error hierarchy for sparsec.

User errors name the value, the rule and the fix. Internal invariants are plain ``assert``s.
"""

from __future__ import annotations


class SparsecError(Exception):
    """Base class of every error sparsec raises on purpose."""


class SpecError(SparsecError, ValueError):
    """A sparsity spec or policy string that does not parse; renders the text with a caret."""

    def __init__(self, message: str, text: str | None = None, column: int | None = None):
        self.message = message
        self.text = text
        self.column = column
        super().__init__(self._render())

    def _render(self) -> str:
        if self.text is None or self.column is None:
            return self.message
        return f"{self.message}\n  {self.text}\n  {' ' * self.column}^"


class ShapeError(SparsecError, ValueError):
    """A layer shape (or tensor) that does not fit the spec it was given."""


class SparsecWarning(UserWarning):
    """Something sparsec chose not to do (for example a mask update skipped on a NaN score)."""


class IRVerifyError(SparsecError):
    """An IR graph that breaks a rule of the verifier (names the node and the rule)."""
