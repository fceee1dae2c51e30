"""potluck's dependency ranges: hivemind and uvicorn, whose internals potluck imports, are bounded above."""

import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.mark.parametrize("name", ["hivemind", "uvicorn"])
def test_a_dependency_used_below_its_public_api_is_bounded_above_and_installed_in_range(name: str) -> None:
    # Prepare
    dependencies = [Requirement(text) for text in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    # Execute
    requirement = next(r for r in dependencies if r.name == name)
    # Assert: a release that moves what potluck imports from below the public API cannot install itself
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), requirement
    assert requirement.specifier.contains(version(name)), (requirement, version(name))
