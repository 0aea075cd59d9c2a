"""The installed package holds every subpackage and the kernel templates."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_listed_for_installation():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sparsec").rglob("__init__.py")}
    assert on_disk | {"sparsec.kernels"} == listed


def test_templates_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["sparsec.kernels"] == "kernels"
    assert config["package-data"]["sparsec.kernels"] == ["*.jinja", "cpu/*.jinja"]  # Triton, then C++ templates
    assert (ROOT / "kernels" / "__init__.py").exists() and list((ROOT / "kernels").glob("*.py.jinja"))
    assert list((ROOT / "kernels" / "cpu").glob("*.cpp.jinja"))
