"""RunConfig: defaults, the run-identity hash, file loading, round trips and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from potluck.protocol.config import MODEL_SIZES, CodecSpec, ConfigError, RunConfig, config_hash
from potluck.protocol.config_files import dump_run_config, load_run_config, parse_overrides, run_config_from_mapping

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY_A = "a" * 64
KEY_B = "0123456789abcdef" * 4

# sha256 of the default config's canonical JSON. If this changes, every default run gets a new identity:
# change it only on purpose (a new field, a new default) and say so in the commit.
DEFAULT_HASH = "715e159011f1eaeea798f244d385bff648af492f65ff729deb4a3d13842fb5d8"


def test_defaults_are_valid_and_hash_is_golden() -> None:
    cfg = RunConfig()
    assert cfg.config_hash == config_hash(cfg) == DEFAULT_HASH
    assert run_config_from_mapping({}).config_hash == DEFAULT_HASH
    assert cfg.aggregate_codec == CodecSpec(name=cfg.codec.name, params={"density": 1 / 16})
    assert MODEL_SIZES == ("tiny", "small", "10m", "124m", "350m", "1b")


@pytest.mark.parametrize(
    "override",
    [
        {"run_name": "other"},
        {"model.size": "small"},
        {"model.block_size": 256},
        {"data.source": "hf:/data/x"},
        {"data.val_fraction": 0.05},
        {"data.max_bytes": "none"},
        {"data.text_field": "body"},
        {"data.held_out_source": "held-out.jsonl"},
        {"inner.lr": 1e-3},
        {"inner.beta1": 0.8},
        {"inner.beta2": 0.99},
        {"inner.weight_decay": 0.0},
        {"inner.warmup_steps": 0},
        {"inner.min_lr_ratio": 0.0},
        {"inner.batch_size": 32},
        {"inner.grad_clip": None},
        {"outer.kind": "average"},
        {"outer.lr": 1.0},
        {"outer.momentum": 0.0},
        {"local_steps": 31},
        {"rounds": 51},
        {"codec.name": "int8-blockwise"},
        {"codec.params.k": 0.01},
        {"aggregate_codec.name": "fp16"},
        {"round_deadline_s": 60.0},
        {"target_tokens_per_round": 1_000_000},
        {"max_update_bytes": 1024},
        {"aggregator_keys": [KEY_A]},
        {"seed": 1},
        {"task.init_from": KEY_B},
        {"validation.held_out_noise_z": 2.0},
    ],
)
def test_every_field_changes_the_hash(override: dict) -> None:
    changed = RunConfig().with_overrides(override)
    assert changed.config_hash != DEFAULT_HASH


def test_int_and_float_params_hash_differently() -> None:
    as_int = run_config_from_mapping({"codec": {"params": {"bits": 2}}})
    as_float = run_config_from_mapping({"codec": {"params": {"bits": 2.0}}})
    assert as_int.config_hash != as_float.config_hash


def test_aggregate_codec_defaults_to_codec_only_when_left_out() -> None:
    codec = {"name": "int8-blockwise", "params": {"block": 64}}
    follows = run_config_from_mapping({"codec": codec})
    assert follows.aggregate_codec == follows.codec
    explicit = run_config_from_mapping({"codec": codec, "aggregate_codec": {"name": "none"}})
    assert explicit.aggregate_codec.name == "none"
    assert run_config_from_mapping({"codec": codec, "aggregate_codec": codec}).config_hash == follows.config_hash


def test_examples_load_with_identical_hashes() -> None:
    toml_cfg = load_run_config(EXAMPLES / "tiny.toml")
    yaml_cfg = load_run_config(EXAMPLES / "tiny.yaml")
    assert toml_cfg == yaml_cfg
    assert toml_cfg.config_hash == yaml_cfg.config_hash
    assert toml_cfg.model.size == "tiny"


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_dump_load_round_trip(tmp_path: Path, fmt: str) -> None:
    cfg = run_config_from_mapping(
        {
            "run_name": "round.trip_1",
            "model": {"size": "124m", "block_size": 1024},
            "data": {"source": 'C:\\data\\"quoted"\tfile', "max_bytes": None},
            "inner": {"lr": 1e-05, "grad_clip": None},
            "codec": {"name": "dct-topk", "params": {"k": 0.0156, "bits": 2, "ef": True, "mode": "x y", "odd key": 1}},
            "aggregate_codec": {"name": "none"},
            "target_tokens_per_round": 123_456,
            "aggregator_keys": [KEY_A, KEY_B],
            "seed": 2**63 - 1,
        }
    )
    path = tmp_path / f"run.{fmt}"
    path.write_text(dump_run_config(cfg, fmt), encoding="utf-8")
    loaded = load_run_config(path)
    assert loaded == cfg
    assert loaded.config_hash == cfg.config_hash


def test_default_dump_round_trips_to_golden_hash(tmp_path: Path) -> None:
    for fmt in ("toml", "yaml"):
        path = tmp_path / f"default.{fmt}"
        path.write_text(dump_run_config(RunConfig(), fmt), encoding="utf-8")
        assert load_run_config(path).config_hash == DEFAULT_HASH


def test_none_word_and_overrides() -> None:
    flags = parse_overrides(
        ["inner.lr=1e-3", "inner.grad_clip=none", "outer.kind=average", f'aggregator_keys=["{KEY_A}"]']
    )
    assert flags == {"inner.lr": 1e-3, "inner.grad_clip": "none", "outer.kind": "average", "aggregator_keys": [KEY_A]}
    cfg = run_config_from_mapping({}, overrides=flags)
    assert cfg.inner.lr == 1e-3
    assert cfg.inner.grad_clip is None
    assert cfg.outer.kind == "average"
    assert cfg.aggregator_keys == (KEY_A,)
    # Applied to the raw mapping, a codec override carries the left-out aggregate codec with it.
    assert run_config_from_mapping({}, overrides={"codec.name": "fp16"}).aggregate_codec.name == "fp16"


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(ValueError):
        cfg.seed = 3  # type: ignore[misc]


# (mapping, substring the one-line message must contain)
INVALID_MAPPINGS = [
    ({"inner": {"lr": -1}}, "inner.lr: Input should be greater than 0 (got -1)"),
    ({"inner": {"lr": 2}}, "inner.lr:"),
    ({"inner": {"beta2": 1}}, "inner.beta2: Input should be less than 1"),
    ({"inner": {"lrr": 1}}, "unknown field 'inner.lrr'"),
    ({"colour": "blue"}, "unknown field 'colour'"),
    ({"aggregator_keys": ["xyz" * 21 + "a"]}, "aggregator_keys[0]: must be an Ed25519 public key"),
    ({"aggregator_keys": [KEY_A.upper()]}, "aggregator_keys[0]:"),
    ({"aggregator_keys": [KEY_A[:-2]]}, "aggregator_keys[0]:"),
    ({"aggregator_keys": [KEY_A, KEY_B, KEY_A]}, "aggregator_keys: entry 2 repeats entry 0"),
    ({"aggregator_keys": KEY_A}, "aggregator_keys:"),
    ({"model": {"size": "huge"}}, "model.size: Input should be 'tiny'"),
    ({"model": {"block_size": 4}}, "model.block_size: Input should be greater than or equal to 8"),
    ({"run_name": "has space"}, "run_name: must be 1-64 characters"),
    ({"run_name": ""}, "run_name:"),
    ({"run_name": "x" * 65}, "run_name:"),
    ({"run_name": 5}, "run_name: Input should be a valid string"),
    ({"local_steps": "many"}, "local_steps: Input should be a valid integer"),
    ({"local_steps": 2.5}, "local_steps: Input should be a valid integer"),
    ({"local_steps": 0}, "local_steps:"),
    ({"inner": 3}, "inner: Input should be a valid dictionary"),
    ({"outer": {"kind": "adam"}}, "outer.kind:"),
    ({"round_deadline_s": float("inf")}, "round_deadline_s: Input should be a finite number"),
    ({"codec": {"name": "DCT TopK"}}, "codec.name:"),
    ({"codec": {"params": {"k": [1, 2]}}}, "codec.params: parameter 'k' must be a number, string or boolean"),
    ({"data": {"source": "hf:"}}, "data.source:"),
    ({"data": {"val_fraction": 0.5}}, "data.val_fraction:"),
    ({"data": {"text_field": " "}}, "data.text_field:"),
    ({"data": {"held_out_source": "hf:"}}, "data.held_out_source:"),
    ({"data": {"source": "a.jsonl", "held_out_source": "a.jsonl"}}, "would be scored on text it trains on"),
    ({"seed": -1}, "seed:"),
    ({"rounds": 2, "local_steps": 3}, "inner.warmup_steps (20) is longer than the whole run"),
]


@pytest.mark.parametrize(("mapping", "expected"), INVALID_MAPPINGS)
def test_invalid_mapping_names_the_field(mapping: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_config_from_mapping(mapping, source="run.toml")
    message = str(info.value)
    assert message.startswith("run.toml: ")
    assert expected in message
    assert "\n" not in message


def test_several_errors_join_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        run_config_from_mapping({"inner": {"lr": -1, "beta2": 1}, "seed": -1}, source="run.toml")
    message = str(info.value)
    assert message.count("; ") == 2
    assert len(info.value.problems) == 3
    assert "\n" not in message


# (file name, file text or None for "do not create", substring of the message)
INVALID_FILES = [
    ("run.toml", "[inner]\nlr = -1\n", "run.toml: inner.lr: Input should be greater than 0 (got -1)"),
    ("run.toml", "[inner]\nlrr = 0.1\n", "run.toml: unknown field 'inner.lrr'"),
    ("run.toml", "[inner]\nlr = = 3\n", "invalid TOML: "),
    ("run.yaml", "inner:\n  lr: [1\n", "invalid YAML at line"),
    ("run.yml", "inner:\n\tlr: 1\n", "invalid YAML at line 2"),
    ("run.yaml", "- 1\n- 2\n", "the top level must be a mapping of fields (got a list)"),
    ("run.yaml", "just a string\n", "the top level must be a mapping"),
    ("missing.toml", None, "missing.toml: no such file"),
    ("run.json", "{}", "unknown config format '.json'"),
    ("run", "", "unknown config format '(no extension)'"),
]


@pytest.mark.parametrize(("name", "text", "expected"), INVALID_FILES)
def test_invalid_file_gives_one_line_naming_the_file(
    tmp_path: Path, name: str, text: str | None, expected: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_malformed_toml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('run_name = "ok"\n\n[inner]\nlr = = 3\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 4"):
        load_run_config(path)


def test_directory_and_non_utf8_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_run_config(folder)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"run_name = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_run_config(binary)


def test_empty_files_mean_defaults(tmp_path: Path) -> None:
    for name in ("empty.toml", "empty.yaml"):
        path = tmp_path / name
        path.write_text("", encoding="utf-8")
        assert load_run_config(path).config_hash == DEFAULT_HASH


def test_bad_flags_are_refused() -> None:
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["inner.lr"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        RunConfig().with_overrides({"seed.x": 1})
    with pytest.raises(ConfigError, match="unknown field 'inner.lrr'"):
        RunConfig().with_overrides({"inner.lrr": 1})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"validation.max_norm_z": 0}, "validation.max_norm_z"),
        ({"validation.min_cosine": 1.5}, "validation.min_cosine"),
        ({"validation.min_updates": 2}, "validation.min_updates"),
        ({"aggregation.kind": "krum"}, "aggregation.kind"),
        ({"aggregation.trim_fraction": 0.5}, "aggregation.trim_fraction"),
        ({"aggregation.max_weight_ratio": 0.5}, "aggregation.max_weight_ratio"),
    ],
)
def test_bad_validation_and_aggregation_settings_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_config_from_mapping({}, overrides=overrides)


def test_held_out_noise_z_is_a_finite_non_negative_number() -> None:
    assert RunConfig().with_overrides({"validation.held_out_noise_z": 0.0}).validation.held_out_noise_z == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="held_out_noise_z"):
            RunConfig().with_overrides({"validation.held_out_noise_z": bad})
