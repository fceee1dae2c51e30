"""What an operator meets before anything runs: port bounds, the help's default hints, and the commands the docs name.

All in-process (typer's CliRunner and the command tree it builds, its own copy of click's): no node is started.
"""

import functools
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.markup import render
from typer.testing import CliRunner

from potluck.cli import aggregator as aggregator_command
from potluck.cli import peer as peer_command
from potluck.cli.aggregator import AggregatorFlags
from potluck.cli.app import app
from potluck.cli.common import UsageError
from potluck.cli.peer_flags import PeerFlags

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the installed console scripts, and the `potluck` command each one runs
SCRIPTS = {"potluck": (), "peer": ("peer",), "aggregator-server": ("aggregator",)}


def _is_group(command: Any) -> bool:
    """Whether a command of typer's tree has subcommands (typer carries its own click, so no isinstance)."""
    return isinstance(getattr(command, "commands", None), dict)


@functools.cache
def _tree() -> Any:
    """The `potluck` command tree as typer builds it for a run."""
    command = typer.main.get_command(app)
    assert _is_group(command)
    return command


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group under `command`, with the words that name it."""
    yield path, command
    if _is_group(command):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


# ----------------------------------------------------------------- ports


def test_every_port_flag_takes_0_to_65535() -> None:
    # Execute
    ranges = {
        f"{' '.join(path)} {param.opts[0]}": (getattr(param, "min", None), getattr(param, "max", None))
        for path, command in _commands(_tree())
        for param in command.params
        if param.name and param.name.endswith("port")
    }
    # Assert
    assert {
        "aggregator --port",
        "aggregator --http-port",
        "peer --port",
        "peer --http-port",
        "swarm --http-port",
    } <= set(ranges)
    assert {flag: bounds for flag, bounds in ranges.items() if bounds != (0, 65535)} == {}


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Where a command that got past its flags would fail the test at once instead of starting a node or a swarm."""

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the command got past its flags and would have started")

    monkeypatch.setattr(aggregator_command, "run_aggregator", started)
    monkeypatch.setattr(peer_command, "run_peer", started)
    fake_swarm = types.ModuleType("potluck.lab.swarm")  # the real one takes seconds to import
    fake_swarm.SwarmOptions = fake_swarm.run_swarm = fake_swarm.sigterm_stops_the_swarm = started  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "potluck.lab.swarm", fake_swarm)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", ["aggregator", "peer", "swarm"])
def test_an_http_port_over_65535_is_refused_before_anything_starts(command: str, nothing_starts: Path) -> None:
    # Execute
    result = CliRunner().invoke(
        app, [command, "--http-port", "99999"], env={"HOME": str(nothing_starts), "COLUMNS": "80"}
    )
    # Assert: the usage error's message is one line naming the flag and the bound
    assert result.exit_code == 2, result.output
    said = [line for line in result.output.splitlines() if "Invalid value for '--http-port'" in line]
    assert len(said) == 1 and "65535" in said[0], result.output
    assert list(nothing_starts.iterdir()) == []  # no identity, state or run directory made


@pytest.mark.parametrize("flags", [AggregatorFlags, PeerFlags])
def test_a_node_started_by_a_swarm_refuses_a_port_over_65535_in_one_line(
    flags: type[AggregatorFlags] | type[PeerFlags],
) -> None:
    with pytest.raises(UsageError) as caught:
        flags.parsed({"http_port": 65536})
    assert str(caught.value).startswith("--http-port: ") and "\n" not in str(caught.value)


# ----------------------------------------------------------------- help


def _hints(help_text: str) -> list[str]:
    """The `[default: ...]` hints a help text means to show (its markup escapes taken off)."""
    return re.findall(r"\[default: [^\]]*\]", help_text.replace("\\[", "["))


@pytest.mark.parametrize("columns", ["80", "100", "200"])
@pytest.mark.parametrize("command", ["peer", "aggregator", "swarm"])
def test_help_shows_every_default_hint_at_any_width(command: str, columns: str) -> None:
    # Prepare
    params = _tree().commands[command].params
    hints = [hint for param in params for hint in _hints(getattr(param, "help", None) or "")]
    # Execute
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": columns})
    # Assert: each hint is there, wherever the table wrapped it
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.replace("│", " ").split())
    assert len(hints) >= 2
    assert [hint for hint in hints if hint not in shown] == []


def test_no_help_text_loses_brackets_to_rich_markup() -> None:
    # Execute: typer reads every help text as rich markup, where an unescaped [word...] is a tag and vanishes
    lost = {
        f"{' '.join(path)} {getattr(param, 'opts', [param.name])[0]}": param.help
        for path, command in _commands(_tree())
        for param in command.params
        if (param_help := getattr(param, "help", None))
        and render(param_help).plain.count("[") != param_help.replace("\\[", "[").count("[")
    }
    # Assert
    assert lost == {}


# ----------------------------------------------------------------- the docs' commands


def _snippets(text: str) -> Iterator[str]:
    """What a doc shows as code: each line of a fenced block and each inline code span of the prose."""
    prose: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            yield line
        else:
            prose.append(line)
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        yield span.replace("\n", " ")


def _invocations(snippet: str) -> Iterator[list[str]]:
    """The words of each shell command in `snippet` (`a && b` is two), env settings and sudo left off."""
    for part in re.split(r"\s(?:&&|\|\||\|)\s|;", snippet.split(" #")[0]):
        words = part.split()
        while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] == "sudo"):
            words.pop(0)
        if words[:3] in (["python", "-m", "potluck"], ["python3", "-m", "potluck"]):
            words = ["potluck", *words[3:]]
        if words:
            yield words


def _doc_commands() -> list[tuple[str, list[str]]]:
    """(where, words) of every command the README and docs/*.md show a user to run."""
    found = []
    for doc in DOCS:
        for snippet in _snippets(doc.read_text(encoding="utf-8")):
            for words in _invocations(snippet):
                if words[0] in SCRIPTS or (words[0] in _tree().commands and any(w.startswith("--") for w in words)):
                    found.append((f"{doc.relative_to(ROOT)}: {snippet.strip()}", words))
    return found


def _check(words: list[str], root: Any) -> tuple[tuple[str, ...], list[str]]:
    """The command path `words` runs and what is wrong with it (a missing command or flag), if anything."""
    if words[0] not in SCRIPTS:
        return (), [f"`{words[0]}` is no installed command; write `potluck {words[0]}`"]
    path = SCRIPTS[words[0]]
    command = root
    for name in path:
        command = root.commands[name]
    problems = []
    rest = words[1:]
    while _is_group(command) and rest and re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", rest[0]):
        names = rest.pop(0).split("|")  # `bans list|add|lift` names three
        problems += [f"no command `{' '.join((*path, n))}`" for n in names if n not in command.commands]
        if names[0] not in command.commands:
            return path, problems
        path, command = (*path, names[0]), command.commands[names[0]]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    for word in rest:
        flag = word.strip("()[],.;:").split("=")[0]
        if flag.startswith("--") and flag not in known:
            problems.append(f"`{' '.join(('potluck', *path))}` has no {flag}")
    return path, problems


def test_the_installed_scripts_are_the_ones_the_docs_may_name() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(SCRIPTS)


def test_every_command_and_flag_the_docs_name_exists() -> None:
    # Prepare
    root = _tree()
    commands = _doc_commands()
    # Execute
    problems = {where: bad for where, words in commands if (bad := _check(words, root)[1])}
    # Assert
    assert len(commands) > 40  # the parser still finds the docs' commands
    assert problems == {}


def test_every_command_the_docs_name_answers_help() -> None:
    # Prepare
    root = _tree()
    paths = sorted({_check(words, root)[0] for _, words in _doc_commands()})
    # Execute
    failed = {
        " ".join(path): result.output
        for path in paths
        if (result := CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "100"})).exit_code != 0
    }
    # Assert
    assert len(paths) > 10 and failed == {}
