"""A wheel holds exactly the packages ``pyproject.toml`` lists: a sub-package missing there installs editable
but vanishes from a built wheel (the runtime-only serving recipe installs one)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join((name, *init.parent.relative_to(ROOT / folder).parts))
             for name, folder in setuptools["package-dir"].items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found == set(setuptools["packages"])
