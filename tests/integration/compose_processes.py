"""Run a docker-compose file's services as local processes, the way Docker would start them, but without Docker.

No Docker engine runs on CI, yet the compose file must not drift from the CLI. So the file is read as
Compose reads it (YAML merge keys, `${VAR:-default}` interpolation), each service's command is run
after the image's ENTRYPOINT (read from the Dockerfile), and only what a container changes is mapped:
service names and 0.0.0.0 become 127.0.0.1, named volumes become temporary directories, each
container gets a home of its own, `potluck` and `python` are this interpreter (`potluck` also on the PATH
of a service's shell script). Services start in
`depends_on` order, waiting for a dependency's own health check when the file asks for that.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from potluck.lab.children import Child, stop_children

_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution over a loaded file: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        found = env.get(name)
        if op == ":-" and not found or op == "-" and found is None:
            return arg
        if op in (":?", "?") and not found:
            raise ValueError(f"compose variable {name} is required: {arg}")
        return found or ""

    return _VARIABLE.sub(substitute, value)


def load_compose(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """The compose file as Compose sees it: merge keys resolved by YAML, variables substituted from `env`."""
    return interpolate(yaml.safe_load(path.read_text()), env)


def dockerfile_entrypoint(path: Path) -> list[str]:
    """The exec-form ENTRYPOINT of a Dockerfile (the last one wins, as in Docker)."""
    entrypoints = [line for line in path.read_text().splitlines() if line.startswith("ENTRYPOINT ")]
    if not entrypoints:
        raise ValueError(f"{path} has no ENTRYPOINT")
    return json.loads(entrypoints[-1].removeprefix("ENTRYPOINT "))


def log_of(container: Child) -> str:
    """What a started replica has printed so far (stdout and stderr)."""
    return container.log_path.read_text(errors="replace")


class ComposeProcesses:
    """A compose project's services run as local processes under `work_dir`."""

    def __init__(self, compose: dict[str, Any], *, entrypoint: list[str], work_dir: Path) -> None:
        self.compose = compose
        self.entrypoint = entrypoint
        self.work_dir = work_dir
        self.services: dict[str, Any] = compose["services"]
        self.volumes = {name: work_dir / "volumes" / name for name in compose.get("volumes") or {}}
        self.containers: list[Child] = []

    def default_services(self) -> list[str]:
        """What `docker compose up` starts: every service outside a profile, dependencies first."""
        chosen = [name for name, service in self.services.items() if not service.get("profiles")]
        ordered: list[str] = []

        def visit(name: str) -> None:
            if name not in ordered:
                for dependency in self.depends_on(name):
                    visit(dependency)
                ordered.append(name)

        for name in chosen:
            visit(name)
        return ordered

    def depends_on(self, name: str) -> dict[str, dict[str, Any]]:
        """A service's dependencies with their conditions (the short list form has none)."""
        dependencies = self.services[name].get("depends_on") or {}
        return {d: {} for d in dependencies} if isinstance(dependencies, list) else dependencies

    def rewrite(self, text: str) -> str:
        """One argument as this machine needs it: service hosts and 0.0.0.0 to loopback, volumes to directories."""
        for service in self.services:
            text = text.replace(f"://{service}:", "://127.0.0.1:").replace(f"://{service}/", "://127.0.0.1/")
            text = text.replace(f"/dns4/{service}/", "/ip4/127.0.0.1/")
        return text.replace("0.0.0.0", "127.0.0.1")

    def _mounts(self, service: dict[str, Any]) -> list[tuple[str, Path]]:
        mounts = []
        for entry in service.get("volumes") or []:
            source, target = (entry.split(":")[:2]) if isinstance(entry, str) else (entry["source"], entry["target"])
            mounts.append((target, self.volumes[source]))
        return sorted(mounts, key=lambda m: -len(m[0]))  # the deepest mount point first

    def argv(self, service: dict[str, Any], words: list[str]) -> list[str]:
        """A service's command line with its programs and paths as they are here."""
        mounts = self._mounts(service)
        out = []
        for word in words:
            word = self.rewrite(word)
            for target, directory in mounts:
                word = word.replace(target, str(directory))
            out.append(word)
        programs = {"potluck": [sys.executable, "-m", "potluck"], "python": [sys.executable]}
        return [*programs.get(out[0], [out[0]]), *out[1:]]

    def _programs_on_path(self) -> str:
        """PATH with `potluck` as this interpreter's, for the commands a service's shell script runs."""
        programs = self.work_dir / "bin"
        programs.mkdir(exist_ok=True)
        shim = programs / "potluck"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m potluck "$@"\n')
        shim.chmod(0o755)
        return f"{programs}{os.pathsep}{os.environ.get('PATH', '')}"

    def healthcheck_argv(self, name: str) -> list[str] | None:
        """The service's health check test as a command line; None when it declares none."""
        service = self.services[name]
        test = (service.get("healthcheck") or {}).get("test")
        if not test or test == ["NONE"]:
            return None
        if isinstance(test, str):
            return ["sh", "-c", self.rewrite(test)]
        if test[0] == "CMD-SHELL":
            return ["sh", "-c", self.rewrite(test[1])]
        return self.argv(service, test[1:])

    def start(self, name: str, *, replica: int = 1) -> Child:
        """Start one replica of service `name` (its command after the image's entrypoint)."""
        service = self.services[name]
        command = service.get("command") or []
        words = [*(service.get("entrypoint") or self.entrypoint), *command]
        for directory in self.volumes.values():
            directory.mkdir(parents=True, exist_ok=True)
        home = self.work_dir / "homes" / f"{name}-{replica}"
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1", "PATH": self._programs_on_path()}
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        env.update({k: str(v) for k, v in environment.items()})
        log_path = self.work_dir / f"{name}-{replica}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(  # noqa: S603 - the compose file's own command
                self.argv(service, words),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=home,
                env=env,
                start_new_session=True,
            )
        container = Child(name=f"{name}-{replica}", process=process, log_path=log_path)
        self.containers.append(container)
        return container

    def wait_healthy(self, name: str, container: Child, *, timeout_s: float, interval_s: float = 0.5) -> None:
        """Run the service's health check until it passes; AssertionError with the log if it never does."""
        check = self.healthcheck_argv(name)
        assert check is not None, f"service {name} declares no health check"
        deadline = time.monotonic() + timeout_s
        while True:
            if container.process.poll() is not None:
                raise AssertionError(f"{container.name} exited ({container.process.returncode}):\n{log_of(container)}")
            if subprocess.run(check, capture_output=True, timeout=30).returncode == 0:  # noqa: S603
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}'s health check did not pass in {timeout_s:.0f} s:\n{log_of(container)}")
            time.sleep(interval_s)  # the health check's own interval, as Docker polls it

    def up(self, *, scale: dict[str, int], health_timeout_s: float) -> dict[str, list[Child]]:
        """`docker compose up --scale ...`: start the default services, honouring depends_on conditions."""
        started: dict[str, list[Child]] = {}
        for name in self.default_services():
            for dependency, how in self.depends_on(name).items():
                if how.get("condition") == "service_healthy":
                    self.wait_healthy(dependency, started[dependency][0], timeout_s=health_timeout_s)
            started[name] = [self.start(name, replica=i + 1) for i in range(scale.get(name, 1))]
        return started

    def check_running(self) -> None:
        """AssertionError, with its log, if any started replica has exited with an error."""
        for container in self.containers:
            code = container.process.poll()
            if code not in (None, 0):
                raise AssertionError(f"{container.name} exited with status {code}:\n{log_of(container)[-3000:]}")

    def down(self) -> None:
        """Stop every started replica and its daemon (SIGTERM, then SIGKILL of each process group)."""
        stop_children(self.containers)
