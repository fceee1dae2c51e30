"""potluck's dependency ranges: hivemind, whose internals potluck imports, is bounded above."""

import sys
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_hivemind_is_bounded_above_and_the_installed_version_is_in_range() -> None:
    # Prepare
    dependencies = [Requirement(text) for text in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    # Execute
    hivemind = next(r for r in dependencies if r.name == "hivemind")
    # Assert: a release that moves what potluck imports from below hivemind's public API cannot install itself
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in hivemind.specifier), hivemind
    assert hivemind.specifier.contains(version("hivemind")), (hivemind, version("hivemind"))
