"""Reading and writing a RunConfig: TOML and YAML files, mappings the CLI builds, ``key.path=value`` flags.

Configs come from files (``load_run_config``), from mappings built by the CLI (``run_config_from_mapping``)
and from flags (``parse_overrides`` + ``overrides=``); ``dump_run_config`` writes one back as TOML or YAML.
Every problem surfaces as one ``ConfigError`` line naming the file and the field. TOML has no null, so
``dump_run_config`` writes an optional field that is off as the string ``"none"``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from potluck.protocol.config import ConfigError, RunConfig
from potluck.protocol.file_store import MAX_STORED_BYTES, TOKENIZERS, store
from potluck.protocol.weights_files import WeightsError, store_weights

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


MAX_HF_CONFIG_BYTES = 1_000_000  # a transformers config.json is a few kilobytes
_SHA256 = re.compile(r"[0-9a-f]{64}")

# ---------------------------------------------------------------------------------------------- loading


def run_config_or_default(path: str | Path | None, *, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The run config at `path`, or the embedded default when there is none, with `overrides` applied either way."""
    if path is not None:
        return load_run_config(path, overrides=overrides)
    data = _apply_overrides({}, overrides, "<flags>") if overrides else {}
    return run_config_from_mapping(_read_local_files(data, "--set", relative_to=Path.cwd()))


def load_run_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a RunConfig from a ``.toml``, ``.yaml`` or ``.yml`` file; raises ConfigError naming the file.

    `overrides` (dotted keys, see ``parse_overrides``) are applied to the file's mapping before validation.
    """
    source = str(path)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(source, [f"unknown config format {suffix or '(no extension)'!r}; use .toml, .yaml or .yml"])
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["no such file"]) from None
    except IsADirectoryError:
        raise ConfigError(source, ["is a directory, not a config file"]) from None
    except PermissionError:
        raise ConfigError(source, ["permission denied; check the file's mode and owner"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    data = _parse_toml(text, source) if suffix == ".toml" else _parse_yaml(text, source)
    if isinstance(data, Mapping):  # a file's path is the file's own, a flag's the working directory's
        data = _read_local_files(data, source, relative_to=path.parent)
        if overrides:
            data = _read_local_files(_apply_overrides(data, overrides, source), source, relative_to=Path.cwd())
    return run_config_from_mapping(data, source=source)


def run_config_from_mapping(
    data: Mapping[str, Any], *, source: str = "<flags>", overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Validate a nested mapping (as read from a file or built from flags) into a RunConfig.

    Missing fields take their defaults; `overrides` with dotted keys replace single fields first.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(source, [f"the top level must be a mapping of fields (got {_kind(data)})"])
    if overrides:
        data = _apply_overrides(data, overrides, source)
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(source, [_describe(error) for error in exc.errors()]) from None


def _read_local_files(data: Mapping[str, Any], source: str, *, relative_to: Path) -> Mapping[str, Any]:
    """`data` with the local files it names read in (hf_config) or stored and named by hash (tokenizer, init_from)."""
    data = _store_tokenizer_file(_read_hf_config_file(data, source, relative_to=relative_to), source, relative_to)
    return _store_init_weights(data, source, relative_to)


def _store_init_weights(data: Mapping[str, Any], source: str, relative_to: Path) -> Mapping[str, Any]:
    """`data` with a task.init_from given as a path replaced by the weights' sha256, the weights kept in the store."""
    task = data.get("task")
    value = task.get("init_from") if isinstance(task, Mapping) else None
    if not isinstance(value, str) or _SHA256.fullmatch(value) or value.strip().lower() == "none":
        return data
    assert isinstance(task, Mapping)
    try:
        sha = store_weights(relative_to / Path(value).expanduser(), shown=value)
    except WeightsError as e:
        raise ConfigError(source, [f"task.init_from: {e}"]) from None
    return {**data, "task": {**task, "init_from": sha}}


def _store_tokenizer_file(data: Mapping[str, Any], source: str, relative_to: Path) -> Mapping[str, Any]:
    """`data` with a data.tokenizer given as a path replaced by the file's sha256, the file kept in the store."""
    section = data.get("data")
    value = section.get("tokenizer") if isinstance(section, Mapping) else None
    if not isinstance(value, str) or _SHA256.fullmatch(value) or value.strip().lower() == "none":
        return data
    assert isinstance(section, Mapping)
    path = relative_to / Path(value).expanduser()
    try:
        if path.stat().st_size > MAX_STORED_BYTES:
            raise ConfigError(source, [f"data.tokenizer: {value} is over {MAX_STORED_BYTES} bytes"])
        sha = store(TOKENIZERS, path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(source, [f"data.tokenizer: no such file {value}"]) from None
    except OSError as exc:
        raise ConfigError(source, [f"data.tokenizer: cannot read {value}: {exc}"]) from None
    return {**data, "data": {**section, "tokenizer": sha}}


def _read_hf_config_file(data: Mapping[str, Any], source: str, *, relative_to: Path) -> Mapping[str, Any]:
    """`data` with a task.hf_config given as a file path replaced by the file's JSON (local configs only)."""
    task = data.get("task")
    value = task.get("hf_config") if isinstance(task, Mapping) else None
    if not isinstance(value, str) or value.lstrip().startswith("{") or value.strip().lower() == "none":
        return data
    assert isinstance(task, Mapping)
    path = relative_to / Path(value).expanduser()
    try:
        if path.stat().st_size > MAX_HF_CONFIG_BYTES:
            raise ConfigError(source, [f"task.hf_config: {value} is over {MAX_HF_CONFIG_BYTES} bytes"])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [f"task.hf_config: no such file {value}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"task.hf_config: cannot read {value}: {exc}"]) from None
    return {**data, "task": {**task, "hf_config": text}}


def run_config_from_toml(text: str, *, source: str) -> RunConfig:
    """Validate TOML text (e.g. a config carried inside a state payload) into a RunConfig; ConfigError if not."""
    return run_config_from_mapping(_parse_toml(text, source), source=source)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn CLI flags like ``inner.lr=1e-3`` or ``aggregator_keys=["ab..."]`` into ``{"inner.lr": 0.001}``.

    Values are read as JSON where they parse (numbers, true/false, null, lists, quoted strings), else kept as
    plain strings (``outer.kind=average``, ``grad_clip=none``). Raises ConfigError on a flag without "=".
    """
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("<flags>", [f"expected key.path=value (got {item!r})"])
        try:
            result[key] = json.loads(raw)
        except ValueError:
            result[key] = raw.strip()
    return result


def _apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Deep-copy the mapping's nested dicts along each dotted key and set the leaf."""
    merged: dict[str, Any] = dict(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(source, [f"bad field path {dotted!r}"])
        node = merged
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part, {})
            if not isinstance(child, Mapping):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(source, [f"unknown field {dotted!r} ({where!r} is not a section)"])
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return merged


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message already carries "(at line L, column C)".
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"invalid YAML{where}: {problem}"]) from None
    return {} if data is None else data  # an empty file means all defaults, as an empty TOML file does


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", type(None): "nothing"}.get(type(value), type(value).__name__)


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``field.path: problem (got value)``."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    if error["type"] == "extra_forbidden":
        return f"unknown field {path!r}"
    message = error["msg"]
    if error["type"] == "value_error":
        message = str(error["ctx"]["error"])  # drop pydantic's "Value error, " prefix
    got = repr(error.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."  # room for a whole 64-hex key
    text = f"{message} (got {got})" if "input" in error else message
    return f"{path}: {text}" if path else text


# ---------------------------------------------------------------------------------------------- dumping


def dump_run_config(cfg: RunConfig, fmt: Literal["toml", "yaml"] = "toml") -> str:
    """Write `cfg` as TOML or YAML text that loads back to a config with the same hash.

    Every field is written, defaults included, so the file documents the whole run.
    """
    data = cfg.model_dump(mode="json")
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    if fmt == "toml":
        return "\n".join(_toml_table(data, prefix=())).lstrip("\n") + "\n"
    raise ValueError(f"unknown format {fmt!r}; use 'toml' or 'yaml'")


def _toml_table(table: Mapping[str, Any], *, prefix: tuple[str, ...]) -> Iterable[str]:
    """Scalars of a table first, then its sub-tables under ``[a.b]`` headers (TOML's required order)."""
    if prefix:
        yield ""
        yield "[" + ".".join(_toml_key(part) for part in prefix) + "]"
    for key, value in table.items():
        if not isinstance(value, Mapping):
            yield f"{_toml_key(key)} = {_toml_value(value)}"
    for key, value in table.items():
        if isinstance(value, Mapping) and (value or not prefix):
            yield from _toml_table(value, prefix=(*prefix, key))


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'  # TOML has no null; optional fields read this word as None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form, e.g. 0.003 or 1e-05, both valid TOML
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    """A TOML basic string: escape quotes, backslashes and the control characters TOML forbids raw."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
