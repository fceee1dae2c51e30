"""Tests for potluck.aggregator_server.setup: which run a state directory serves, and refusing a mismatch."""

from pathlib import Path

import pytest

from potluck.aggregator_server.setup import RUN_FILE, SetupError, prepare_run, with_own_key
from potluck.protocol.config import RunConfig
from potluck.protocol.config_files import dump_run_config, load_run_config
from potluck.protocol.identity import generate_identity, public_key_to_hex
from potluck.tasks import created, task_for

AGGREGATOR = generate_identity()
OTHER = generate_identity()
OWN_KEY = public_key_to_hex(AGGREGATOR.public_key)
CONFIG = RunConfig(run_name="setup-test", local_steps=5)


def _assert_one_line(error: SetupError) -> None:
    assert "\n" not in str(error)


def test_first_start_writes_run_toml_with_the_aggregators_key(tmp_path: Path) -> None:
    # Prepare
    state_dir = tmp_path / "state" / "run"
    # Execute
    cfg = prepare_run(state_dir=state_dir, config=CONFIG, identity=AGGREGATOR)
    # Assert
    assert cfg.aggregator_keys == (OWN_KEY,)
    assert cfg.run_name == CONFIG.run_name and cfg.local_steps == CONFIG.local_steps
    stored = load_run_config(state_dir / RUN_FILE)
    assert stored.config_hash == cfg.config_hash
    assert sorted(p.name for p in state_dir.iterdir()) == [RUN_FILE]  # no temp file left behind


def test_first_start_without_a_config_serves_the_default_run(tmp_path: Path) -> None:
    cfg = prepare_run(state_dir=tmp_path, config=None, identity=AGGREGATOR)

    assert cfg == created(RunConfig(aggregator_keys=(OWN_KEY,)))
    assert cfg.task.fingerprint == task_for(cfg).fingerprint()  # the run records its architecture
    assert load_run_config(tmp_path / RUN_FILE) == cfg


def test_a_second_start_without_a_config_resumes_the_same_run(tmp_path: Path) -> None:
    first = prepare_run(state_dir=tmp_path, config=CONFIG, identity=AGGREGATOR)

    second = prepare_run(state_dir=tmp_path, config=None, identity=AGGREGATOR)

    assert second.config_hash == first.config_hash
    assert second == first


def test_a_second_start_with_the_same_config_resumes_the_same_run(tmp_path: Path) -> None:
    first = prepare_run(state_dir=tmp_path, config=CONFIG, identity=AGGREGATOR)

    second = prepare_run(state_dir=tmp_path, config=CONFIG, identity=AGGREGATOR)

    assert second.config_hash == first.config_hash


def test_a_different_config_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    # Prepare
    first = prepare_run(state_dir=tmp_path, config=CONFIG, identity=AGGREGATOR)
    before = (tmp_path / RUN_FILE).read_text()
    # Execute
    with pytest.raises(SetupError) as error:
        prepare_run(state_dir=tmp_path, config=CONFIG.with_overrides({"local_steps": 6}), identity=AGGREGATOR)
    # Assert: the message names the directory, the stored run and both fixes; the stored run is untouched
    message = str(error.value)
    _assert_one_line(error.value)
    assert str(tmp_path) in message
    assert first.config_hash[:12] in message
    assert "leave out --config to resume it, or use another --state-dir" in message
    assert (tmp_path / RUN_FILE).read_text() == before


def test_a_config_trusting_other_keys_but_not_this_one_is_refused(tmp_path: Path) -> None:
    # Prepare
    cfg = CONFIG.with_overrides({"aggregator_keys": [public_key_to_hex(OTHER.public_key)]})
    # Execute
    with pytest.raises(
        SetupError, match=f"{AGGREGATOR.fingerprint} is not among the config's aggregator_keys"
    ) as error:
        prepare_run(state_dir=tmp_path, config=cfg, identity=AGGREGATOR)
    # Assert
    _assert_one_line(error.value)
    assert OWN_KEY in str(error.value)  # the fix: the key to add
    assert not (tmp_path / RUN_FILE).exists()


def test_a_config_already_trusting_this_key_is_kept_as_given() -> None:
    cfg = CONFIG.with_overrides({"aggregator_keys": [public_key_to_hex(OTHER.public_key), OWN_KEY]})

    assert with_own_key(cfg, AGGREGATOR) == cfg


@pytest.mark.parametrize(
    "text",
    [
        "run_name = [unclosed",  # not TOML
        'run_name = "bad name!"',  # not a valid config
        "unknown_field = 1",
        "local_steps = 0",
    ],
)
def test_a_corrupt_run_toml_is_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    # Prepare
    (tmp_path / RUN_FILE).write_text(text)
    # Execute
    with pytest.raises(SetupError) as error:
        prepare_run(state_dir=tmp_path, config=None, identity=AGGREGATOR)
    # Assert
    _assert_one_line(error.value)
    assert f"fix or delete {tmp_path / RUN_FILE}" in str(error.value)


@pytest.mark.parametrize("stored_keys", [[], "other"])
def test_a_stored_run_that_does_not_trust_this_aggregator_is_refused(tmp_path: Path, stored_keys: object) -> None:
    # Prepare: the directory was set up for another aggregator identity (or hand-written without any key)
    keys = [public_key_to_hex(OTHER.public_key)] if stored_keys == "other" else []
    (tmp_path / RUN_FILE).write_text(dump_run_config(CONFIG.with_overrides({"aggregator_keys": keys}), "toml"))
    # Execute / Assert: resuming would sign aggregates that the run's peers do not trust
    with pytest.raises(SetupError, match="does not trust this aggregator's key") as error:
        prepare_run(state_dir=tmp_path, config=None, identity=AGGREGATOR)
    _assert_one_line(error.value)


def test_a_stored_run_toml_is_read_back_as_written(tmp_path: Path) -> None:
    stored = CONFIG.with_overrides({"aggregator_keys": [OWN_KEY]})
    (tmp_path / RUN_FILE).write_text(dump_run_config(stored, "toml"))

    assert prepare_run(state_dir=tmp_path, config=None, identity=AGGREGATOR) == stored
