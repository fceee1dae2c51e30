"""The `potluck` console script as a user runs it: real subprocesses, exit codes, one-line errors."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

POTLUCK = [sys.executable, "-c", "from potluck.cli.app import main; main()"]


def run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `potluck ARGS` and capture its output; fails the test if it hangs."""
    return subprocess.run([*POTLUCK, *args], capture_output=True, text=True, timeout=timeout_s, check=False)


def test_keygen_writes_a_private_key_readable_only_by_its_owner(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "id.key"
    result = run("keygen", "--out", str(key), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == str(key)
    assert info["fingerprint"]
    assert len(bytes.fromhex(info["public_key"])) == 32
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_keygen_refuses_to_overwrite_with_one_line(tmp_path: Path) -> None:
    key = tmp_path / "id.key"
    assert run("keygen", "--out", str(key)).returncode == 0
    before = key.read_bytes()
    result = run("keygen", "--out", str(key))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert key.read_bytes() == before


def test_whoami_reads_back_what_keygen_wrote(tmp_path: Path) -> None:
    key = tmp_path / "id.key"
    made = json.loads(run("keygen", "--out", str(key), "--json").stdout)
    result = run("whoami", "--identity", str(key), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == made


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        (None, 0o600, "does not exist"),
        (b"not a key", 0o600, "not a valid potluck key"),
        (b"", 0o600, "empty"),
        ("valid", 0o644, "chmod 600"),
    ],
)
def test_bad_key_is_one_line_naming_the_file_and_the_fix(
    tmp_path: Path, content: bytes | str | None, mode: int, expected: str
) -> None:
    key = tmp_path / "id.key"
    if content == "valid":
        assert run("keygen", "--out", str(key)).returncode == 0
    elif content is not None:
        key.write_bytes(content)
    if key.exists():
        key.chmod(mode)
    result = run("whoami", "--identity", str(key))
    assert result.returncode == 2
    assert str(key) in result.stderr
    assert expected in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_plan_reproduces_the_distro_worked_example() -> None:
    result = run(
        "plan", "--upload-bytes", "2.8e6", "--up", "10e6", "--download-bytes", "86.8e6", "--down", "100e6", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["upload_seconds"] == pytest.approx(2.24, abs=0.005)
    assert out["download_seconds"] == pytest.approx(6.944, abs=0.005)


def test_plan_scenario_one_of_the_scaling_law_paper_is_above_090() -> None:
    result = run(
        "plan",
        "--clusters",
        "2",
        "--gpus-per-cluster",
        "8",
        "--device-flops",
        "150e12",
        "--bandwidth",
        "0.8e9",
        "--batch-tokens",
        "4e6",
        "--local-steps",
        "32",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["K"] > 0.9


def test_plan_auto_times_the_run_here_and_plans_it_for_the_given_link() -> None:
    result = run("plan", "--auto", "--up", "10M", "--down", "100M", "--set", "local_steps=5", "--json")

    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["local_steps"] == 5 and out["step_s"] > 0 and out["upload_bytes"] > 0
    assert out["up_bits_per_s"] == 10e6 and 0 < out["K_potluck"] <= 1


def test_plan_auto_without_a_link_says_what_it_needs() -> None:
    result = run("plan", "--auto", "--up", "10M")

    assert result.returncode == 2
    assert "--join" in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_plan_refuses_junk_with_one_line() -> None:
    result = run("plan", "--up", "fast", "--upload-bytes", "1e6")
    assert result.returncode == 2
    assert "--up" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            (
                "peer",
                "--config",
                "run.toml",
                "--join",
                "/ip4/127.0.0.1/tcp/1/p2p/QmW9UW5tnG2dvJ9UU5Jv5NCLz24ZtQxyLB3hFQC33jHouD",
            ),
            "--config and --set only apply with --serverless",
        ),
        (("peer", "--serverless", "--join", "/ip4/127.0.0.1/tcp/1"), "/p2p/"),
        (("peer", "--serverless", "--set", "inner.lr=-1"), "inner.lr"),
        (("peer",), "no --join address given"),
        (("peer", "--serverless", "--overlap"), "--overlap does not apply with --serverless"),
        (
            ("peer", "--join", "/ip4/127.0.0.1/tcp/1", "--overlap-limit", "0.5"),
            "--overlap-limit only applies with --overlap",
        ),
    ],
)
def test_peer_modes_refuse_what_does_not_fit_them_in_one_line(args: tuple[str, ...], expected: str) -> None:
    result = run(*args)

    assert result.returncode == 2
    assert expected in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_swarm_refuses_an_overlap_limit_without_overlap_in_one_line() -> None:
    result = run("swarm", "--overlap-limit", "0.5")

    assert result.returncode == 2
    assert "--overlap-limit only applies with --overlap" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_a_bad_state_upload_rate_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    result = run("aggregator", "--state-dir", str(tmp_path / "state"), "--state-upload-rate", "fast")

    assert result.returncode == 2
    assert "--state-upload-rate" in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "state").exists()


def test_an_aggregator_with_a_bad_config_fails_before_it_writes_anything(tmp_path: Path) -> None:
    # Prepare
    config = tmp_path / "run.toml"
    config.write_text("[inner]\nlr = -1.0\n")
    state = tmp_path / "state"
    # Execute
    result = run("aggregator", "--state-dir", str(state), "--config", str(config), "--http-port", "0")
    # Assert: no identity.key (nor anything else) was made for a run that cannot start
    assert result.returncode == 2
    assert "inner.lr" in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not state.exists()


def test_bad_config_is_one_line_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[inner]\nlr = -1.0\n")
    result = run("simulate", "--config", str(config))
    assert result.returncode == 2
    assert "inner.lr" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


@pytest.mark.slow
def test_simulate_json_reports_every_arm() -> None:
    result = run(
        "simulate",
        "--peers",
        "2",
        "--rounds",
        "2",
        "--local-steps",
        "3",
        "--warmup-steps",
        "1",
        "--eval-batches",
        "2",
        "--codecs",
        "none,dct-topk",
        "--json",
        timeout_s=240,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [arm["name"] for arm in out["arms"]] == ["ddp", "none", "dct-topk"]
    for arm in out["arms"]:
        assert arm["val_loss"] < out["initial_val_loss"]
        for key in (
            "gap_pct",
            "upload_bytes_per_peer_per_step",
            "upload_bytes_per_param_per_kstep",
            "download_bytes_per_param_per_round",
            "reduction_vs_ddp",
        ):
            assert isinstance(arm[key], float)
    by_name = {arm["name"]: arm for arm in out["arms"]}
    assert by_name["dct-topk"]["reduction_vs_ddp"] > by_name["none"]["reduction_vs_ddp"] > 1


_BOOM = """
from potluck.cli.app import app, handle_errors
from potluck.errors import PotluckError

class BrandNewError(PotluckError):
    pass

@app.command("boom")
def boom(kind: str) -> None:
    raise BrandNewError("the widget is out of range; pass --widget 3") if kind == "new" else RuntimeError("a bug")

handle_errors(app)
"""


def test_a_new_potluck_error_is_one_line_with_no_edit_to_the_cli() -> None:
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", _BOOM, "boom", "new"], capture_output=True, text=True, timeout=120, check=False
    )
    # Assert
    assert result.returncode == 2
    assert result.stderr == "potluck: error: the widget is out of range; pass --widget 3\n"


def test_any_other_exception_is_a_bug_and_keeps_its_traceback() -> None:
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", _BOOM, "boom", "bug"], capture_output=True, text=True, timeout=120, check=False
    )
    # Assert
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "RuntimeError: a bug" in result.stderr
