"""Write docker/constraints.txt: the exact version of every package potluck needs at run time, as installed here.

The image installs its dependencies with these constraints, so a rebuild gets what the tests ran with, not
whatever was released since. Run it in the environment the tests passed in (Linux, the image's Python):

    python docker/pin_versions.py > docker/constraints.txt

torch is left out: the Dockerfile pins it itself (TORCH_VERSION), from the index its build argument names.
"""

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
UNPINNED = {"torch"}  # the Dockerfile's TORCH_VERSION pins it


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def closure(requirements: list[str]) -> dict[str, str]:
    """Every installed distribution these requirements pull in (markers evaluated here), by name, with its version."""
    found: dict[str, str] = {}
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = _name(requirement.name)
        if name in found:
            continue
        distribution = metadata.distribution(requirement.name)
        found[name] = distribution.version
        todo.extend(Requirement(text) for text in distribution.requires or [])
    return found


def main() -> None:
    """Print the constraints file for the image."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = closure(dependencies)
    print("# Exact versions for docker/Dockerfile (pip install -c); written by `python docker/pin_versions.py`.")
    print(f"# From Python {sys.version.split()[0]} on {sys.platform}; the Dockerfile's TORCH_VERSION pins torch.")
    for name, version in sorted(pins.items()):
        if name not in UNPINNED:
            print(f"{name}=={version}")


if __name__ == "__main__":
    main()
