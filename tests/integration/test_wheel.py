"""The package as a release ships it: the wheel and sdist build, and the wheel installs into an empty venv.

An editable install hides what a wheel leaves out (the dashboard's files, the embedded corpus's
config) and which dependencies pyproject.toml forgot. So the wheel is built the way a release
builds it (`python -m build`; --no-isolation only so that the test needs no download of the build
backend), installed with its dependencies into a new virtual environment with nothing else in it
(torch pinned as the README pins it: an unpinned torch is a multi-GB CUDA download), and its three
console scripts are run from a directory outside the repository.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # as the README installs it

pytestmark = pytest.mark.slow


def _run(argv: list[str], *, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)  # noqa: S603


@pytest.mark.timeout(600)
def test_the_wheel_installs_into_an_empty_venv_and_its_console_scripts_answer_help(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        cwd=tmp_path,
        timeout_s=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("potluck-*.whl")
    (sdist,) = dist.glob("potluck-*.tar.gz")
    assert sdist.stat().st_size > 0
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"potluck/web/static/index.html", "potluck/cli/app.py", "potluck/web/static/dashboard.js"} <= names, sorted(
        n for n in names if "static" in n
    )
    assert not any(n.startswith(("tests/", "bench/")) for n in names)

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout_s=120)
    assert made.returncode == 0, made.stderr
    installed = _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--no-compile",  # no .pyc for torch's thousands of files: not what this test checks, and slow
            "--quiet",
            "--disable-pip-version-check",
            TORCH,
            str(wheel),
        ],
        cwd=tmp_path,
        timeout_s=480,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    outside = tmp_path / "elsewhere"  # not the repository: `potluck` must come from the venv
    outside.mkdir()
    for script, says in (("potluck", "swarm"), ("peer", "--join"), ("aggregator-server", "--state-dir")):
        answered = _run([str(venv / "bin" / script), "--help"], cwd=outside, timeout_s=120)
        assert answered.returncode == 0 and says in answered.stdout, (script, answered.stdout, answered.stderr)
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import potluck; print(potluck.__file__)"], cwd=outside, timeout_s=60
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout
