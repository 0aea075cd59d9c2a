"""README's first Python snippet runs as written (real data from scikit-learn, a few seconds)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.slow
def test_the_first_readme_snippet_runs():
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the documentation under test
    model = scope["model"]
    assert all(hasattr(m, "values") for m in (model.fc1, model.fc2))  # really sparse layers
    assert scope["masks"].t == scope["epochs"] * len(scope["loader"])
