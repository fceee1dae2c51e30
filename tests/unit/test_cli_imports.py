"""The command line's modules import downward only: no cycle, not even through a function-local import."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "potluck"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The potluck modules a file imports anywhere in it (a function's body too), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from potluck.cli import peer` imports the module potluck.cli.peer
            found |= {f"{node.module}.{alias.name}" for alias in node.names} & modules or {node.module}
    return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports from `start` back to itself, if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        name, chain = stack.pop()
        for imported in graph[name]:
            if imported == start:
                return [*chain, start]
            if imported not in seen:
                seen.add(imported)
                stack.append((imported, [*chain, imported]))
    return None


def test_no_cli_module_is_on_an_import_cycle() -> None:
    # Prepare
    graph = _graph()
    cli = sorted(name for name in graph if name.startswith("potluck.cli."))
    # Execute
    cycles = [cycle for name in cli if (cycle := _cycle_through(name, graph))]
    # Assert
    assert len(cli) > 10, cli
    assert not cycles, [" -> ".join(cycle) for cycle in cycles]


def test_the_checker_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert _cycle_through("a", graph) == ["a", "b", "c", "a"]
    assert _cycle_through("a", {"a": {"b"}, "b": set()}) is None


def test_the_package_itself_imports_none_of_its_commands() -> None:
    # `import potluck.cli.peer_flags` (as the lab does) must not pull in the whole app
    assert not _imports(PACKAGE / "cli" / "__init__.py", set(_graph()))
