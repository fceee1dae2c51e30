"""docker/docker-compose.yml is valid Compose, and its services, run as processes, train together.

No Docker engine runs here (nor on CI): the file is checked against the Compose specification's own
JSON schema (as vendored by check-jsonschema), then its services are started as local processes by
tests/integration/compose_processes.py, the way `docker compose up --scale peer=2` would start them:
the image's entrypoint and each service's command as written, the health check the file declares
deciding when the peers start. If the file drifts from the CLI, this fails.
"""

import json
import re
import shlex
import sys
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from tests.integration.compose_processes import (
    ComposeProcesses,
    dockerfile_entrypoint,
    interpolate,
    load_compose,
    log_of,
)
from tests.integration.swarm_helpers import free_port, p2pd_pids, wait_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ROUNDS = 2


def _schema_errors(document: Any) -> list[str]:
    schema = json.loads(
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_compose_file_is_valid_compose() -> None:
    assert _schema_errors(yaml.safe_load(COMPOSE.read_text())) == []


def test_the_schema_check_catches_a_broken_compose_file() -> None:
    broken = yaml.safe_load(COMPOSE.read_text())
    # A new mapping, not an edit: services merged from one anchor share its objects.
    broken["services"]["peer"]["depends_on"] = {"aggregator": {"condition": "service_happy"}}
    broken["services"]["aggregator"]["comand"] = broken["services"]["aggregator"].pop("command")  # a typo

    errors = _schema_errors(broken)

    assert any("service_happy" in e for e in errors) and any("'comand'" in e for e in errors), errors


def test_compose_variables_substitute_as_compose_does() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET ${UNSET}", env) == "x d  d x $SET "
    with pytest.raises(ValueError, match="NEEDED is required: say so"):
        interpolate("${NEEDED:?say so}", env)


def test_every_knob_the_file_documents_is_used_and_every_one_used_is_documented() -> None:
    text = COMPOSE.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    documented = set(re.findall(r"#\s+(POTLUCK_[A-Z0-9_]+)\s", header))
    used = set(re.findall(r"\$\{(POTLUCK_[A-Z0-9_]+)", body))
    assert documented == used


def test_every_peer_keeps_its_identity_and_receipts_on_a_named_volume() -> None:
    # Prepare
    compose = load_compose(COMPOSE, {})
    named = set(compose["volumes"])
    for name in ("peer", "gpu-peer"):
        service = compose["services"][name]
        mounts = [entry.split(":")[:2] for entry in service.get("volumes") or []]
        words = " ".join([*(service.get("entrypoint") or []), *service["command"]])
        for flag in ("--identity", "--receipts"):
            # Execute
            found = re.search(rf"{flag}=(\S+)", words)
            # Assert: on a volume, so that a rebuilt container gives the volunteer its key and credit back
            assert found is not None, f"{name} keeps its {flag} in the container"
            path = found.group(1)
            assert any(source in named and path.startswith(f"{target}/") for source, target in mounts), (name, path)


CONSTRAINTS = ROOT / "docker" / "constraints.txt"
VALUED_OPTIONS = {"-r", "-c", "--index-url", "--extra-index-url"}


def _pip_installs(dockerfile: str) -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile runs."""
    installs = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        if line.startswith("RUN "):
            for command in line.removeprefix("RUN ").split("&&"):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    installs.append(words[2:])
    return installs


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_image_installs_every_package_at_a_pinned_version() -> None:
    # Prepare
    dockerfile = DOCKERFILE.read_text()
    arguments = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    pins = dict(
        line.split("==", 1) for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")
    )
    dependencies = [
        Requirement(text) for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    # Execute
    installs = _pip_installs(dockerfile)
    # Assert: each install names exact versions, takes them from the constraints, or is potluck's own source
    assert len(installs) == 3, installs
    for words in installs:
        if "--no-deps" in words:
            continue
        if "-c" in words:
            assert words[words.index("-c") + 1] == "/src/constraints.txt", words
            continue
        assert "-r" not in words, f"pip install {' '.join(words)}: a requirements file of ranges, no constraints"
        named = [w for i, w in enumerate(words) if not w.startswith("-") and words[i - 1] not in VALUED_OPTIONS]
        for requirement in named:
            name, _, version = requirement.partition("==")
            version = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], version)
            assert re.fullmatch(r"\d+(\.\d+)+", version), f"{requirement} is not pinned"
    assert all(re.fullmatch(r"\d+(\.\d+)*(\.post\d+)?", version) for version in pins.values()), pins
    assert "!docker/constraints.txt" in (ROOT / ".dockerignore").read_text().split()  # or the build cannot COPY it
    wanted = {_canonical(r.name) for r in dependencies if r.marker is None or r.marker.evaluate()} - {"torch"}
    assert wanted <= {_canonical(name) for name in pins}, wanted - set(pins)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own local page
        return json.load(response)


def _status(port: int) -> dict[str, Any] | None:
    try:
        return _get_json(f"http://127.0.0.1:{port}/api/status")
    except OSError:
        return None


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_compose_services_run_as_processes_join_and_complete_the_run(tmp_path: Path) -> None:
    before = p2pd_pids()
    http_port, p2p_port = free_port(), free_port()
    env = {
        "POTLUCK_HTTP_PORT": str(http_port),
        "POTLUCK_P2P_PORT": str(p2p_port),
        "POTLUCK_ROUNDS": str(ROUNDS),
        "POTLUCK_LOCAL_STEPS": "10",  # rounds x local steps must cover the default warm-up (20 steps)
        "POTLUCK_ROUND_DEADLINE_S": "60",
        "POTLUCK_BATCH_SIZE": "8",
    }
    project = ComposeProcesses(
        load_compose(COMPOSE, env), entrypoint=dockerfile_entrypoint(DOCKERFILE), work_dir=tmp_path
    )
    assert project.default_services() == ["aggregator", "peer"]  # the gpu profile stays off unless asked for
    try:
        started = project.up(scale={"peer": 2}, health_timeout_s=90)

        def a_round_closed() -> bool:
            project.check_running()  # a service that fails fails the test now, with its log
            status = _status(http_port)
            return status is not None and status["rounds_closed"] >= 1

        wait_until(a_round_closed, timeout_s=120, what="a round to close")
        first = _get_json(f"http://127.0.0.1:{http_port}/api/rounds")[-1]  # newest first
        for peer in started["peer"]:
            assert peer.process.wait(timeout=120) == 0, log_of(peer)[-3000:]
        aggregator = started["aggregator"][0]
        assert aggregator.process.wait(timeout=60) == 0, log_of(aggregator)[-3000:]
    finally:
        project.down()
    assert first["round"] == 0 and first["accepted"] >= 1, first
    assert f"/tcp/{p2p_port}/p2p/" in log_of(aggregator)  # it listened where the compose file published it
    for peer in started["peer"]:  # each trained to the end of the run, its updates accepted
        assert log_of(peer).count("accepted") >= 1, log_of(peer)[-3000:]
    assert (tmp_path / "volumes" / "aggregator-state" / "ledger.sqlite").exists()  # its state is in the volume
    # each replica claimed a slot of the peers' volume: a key of its own, and its receipts, kept there
    slots = sorted((tmp_path / "volumes" / "peer-state").iterdir())
    assert [slot.name for slot in slots] == ["1", "2"]
    assert (slots[0] / "identity.key").read_bytes() != (slots[1] / "identity.key").read_bytes()
    assert all(any((slot / "receipts").iterdir()) for slot in slots)
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=20, what="every p2pd of the compose swarm to exit")
