"""The tree is the architecture: imports between potluck's components point one way only."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "potluck"

# Leaf modules every component may import: the typed events that cross between processes, and the
# error base. They import nothing of ours but each other (see the test below).
LEAVES = {"events", "errors"}

# component -> the potluck components it may import (besides itself and LEAVES)
ALLOWED = {
    "protocol": set(),
    "training": {"protocol"},
    # what a run trains: built from training's models and data; every node gets its model from here
    "tasks": {"protocol", "training"},
    "incentives": {"protocol"},
    # a volunteer checks its own receipts, and plans its run with the pure arithmetic of potluck.planning.plan
    "peer": {"protocol", "training", "tasks", "incentives", "planning"},
    "aggregator_server": {"protocol", "training", "tasks", "incentives"},
    "web": {"protocol"},
    "planning": {"protocol", "training", "tasks"},
    # one-machine tooling: it starts nodes as processes, and the red team drives a peer
    "lab": {"protocol", "training", "tasks", "peer", "cli"},
}
NODES = ("peer", "aggregator_server")


def _potluck_imports(path: Path) -> set[str]:
    """The second-level potluck modules a file imports, e.g. {"protocol", "training"}."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "potluck":
                found.add(parts[1] if len(parts) > 1 else "")
    return found


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_component_imports_only_what_the_design_allows(component: str) -> None:
    # Prepare
    files = sorted((PACKAGE / component).rglob("*.py"))
    # Execute
    bad = {
        f"{path.relative_to(PACKAGE.parent)} imports potluck.{name}"
        for path in files
        for name in _potluck_imports(path) - ALLOWED[component] - LEAVES - {component}
    }
    # Assert
    assert not bad, sorted(bad)


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_the_leaves_import_nothing_of_ours_but_errors(leaf: str) -> None:
    path = PACKAGE / f"{leaf}.py"
    assert _potluck_imports(path) <= {"errors"} - {leaf}


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from potluck.training.models import GPT\nimport potluck.peer.loop\n")
    assert _potluck_imports(bad) == {"training", "peer"}


@pytest.mark.parametrize("node", NODES)
def test_nodes_never_import_the_lab_or_the_cli(node: str) -> None:
    for path in sorted((PACKAGE / node).rglob("*.py")):
        assert not _potluck_imports(path) & {"lab", "cli"}, path


def test_nothing_outside_the_lab_and_the_cli_imports_the_lab() -> None:
    importers = {
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if "lab" in _potluck_imports(path) and not {"lab", "cli"} & set(path.parts)
    }
    assert not importers, sorted(importers)


def test_nothing_outside_the_red_team_and_its_command_imports_the_red_team() -> None:
    importers = {
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if "potluck.lab.redteam" in path.read_text() and "redteam" not in path.parts
    }
    assert importers <= {"potluck/cli/redteam.py", "potluck/lab/swarm.py", "potluck/lab/forkserver.py"}, sorted(
        importers
    )  # the `potluck redteam` command, lazily; the swarm starts and preloads its adversaries
