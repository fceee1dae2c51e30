"""RunConfig: every hyperparameter of one training run, validated at the boundary and content-hashed.

A run is identified by the sha256 of its canonical config (``config_hash``): peers and aggregators
refuse updates whose config hash differs, so a changed config is a different run. Reading and writing
configs (files, flags, dumps) is `potluck.protocol.config_files`; every problem surfaces as one
``ConfigError`` line naming the source and the field, e.g.
``run.toml: inner.lr: Input should be greater than 0 (got -1)``.

TOML has no null, so optional fields accept the string ``"none"`` as well (``grad_clip = "none"``
turns clipping off).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from potluck.errors import PotluckError
from potluck.protocol.shards import check_shard_keys

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised on 3.10 only
    pass

__all__ = [
    "MODEL_SIZES",
    "CodecSpec",
    "ConfigError",
    "DataSpec",
    "InnerOptimizerSpec",
    "ModelSpec",
    "OuterOptimizerSpec",
    "RunConfig",
    "TaskSpec",
    "check_data_source",
    "config_hash",
]

# The built-in GPT family; must equal the keys of potluck.training.models.MODEL_SIZES (a test checks).
ModelSize = Literal["tiny", "small", "10m", "124m", "350m", "1b"]
MODEL_SIZES: tuple[str, ...] = get_args(ModelSize)

_RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CODEC_NAME = re.compile(r"[a-z0-9-]{1,32}")
_ED25519_HEX = re.compile(r"[0-9a-f]{64}")  # a raw 32-byte Ed25519 public key, lowercase hex
BUILT_IN_TASKS = ("gpt", "hf-causal-lm")
_TASK_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _none_word(value: Any) -> Any:
    """Read the string "none" as None: TOML cannot write null, so optional fields accept this word."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return value


def _check_run_name(value: str) -> str:
    if not _RUN_NAME.fullmatch(value):
        raise ValueError("must be 1-64 characters from A-Z a-z 0-9 . _ -")
    return value


def _check_codec_name(value: str) -> str:
    if not _CODEC_NAME.fullmatch(value):
        raise ValueError("must be a codec's registry name: 1-32 characters from a-z 0-9 -, e.g. dct-topk")
    return value


def _check_aggregator_key(value: str) -> str:
    if not _ED25519_HEX.fullmatch(value):
        raise ValueError("must be an Ed25519 public key as 64 lowercase hex characters")
    return value


def _check_distinct(keys: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key in seen:
            raise ValueError(f"entry {index} repeats entry {seen[key]}; list each key once")
        seen[key] = index
    return keys


def _check_task_name(value: str) -> str:
    if value not in BUILT_IN_TASKS and not _TASK_REF.fullmatch(value):
        choices = ", ".join(BUILT_IN_TASKS)
        raise ValueError(f'must be one of {choices} or a task of your own as "package.module:attribute"')
    return value


def _check_sha256(value: str) -> str:
    if not _SHA256_HEX.fullmatch(value):
        raise ValueError("must be a sha256 as 64 lowercase hex characters")
    return value


def _check_json_tree(value: Any, path: str = "") -> Any:
    """Refuse anything JSON cannot carry exactly (NaN, infinities, non-string keys), so the run's hash is stable."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path or 'keys'}: keys must be strings, not {key!r}")
            _check_json_tree(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json_tree(item, f"{path}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: must be finite, not {value!r}")
    elif value is not None and not isinstance(value, bool | int | float | str):
        raise ValueError(f"{path}: a {type(value).__name__} is not a JSON value")
    return value


def _hf_config_text(value: Any) -> Any:
    """A transformers config as canonical JSON text, from a mapping or JSON text; a path is config_files' to read."""
    if isinstance(value, str):
        if not value.lstrip().startswith("{"):
            raise ValueError("must be the model's transformers config: a table, JSON text, or a config.json file")
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"is not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        return value  # let pydantic report the type error
    _check_json_tree(value)
    if not isinstance(value.get("model_type"), str):
        raise ValueError('needs "model_type", the architecture\'s name in transformers (e.g. "llama", "gpt2")')
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def check_data_source(value: str) -> str:
    """A data source's spelling, checked before anything is read (the config's and a peer's --data)."""
    if not value.strip():
        raise ValueError('must be "builtin", a text, .jsonl or .parquet file, a directory, or "hf:<dataset dir>"')
    if value.startswith("hf:") and not value[3:].strip():
        raise ValueError('"hf:" needs the directory of a dataset saved on disk, e.g. "hf:/data/fineweb"')
    return value


def _check_text_field(value: str) -> str:
    if not value.strip():
        raise ValueError("must name the field (or column) that holds each record's text, e.g. text")
    return value


def _check_codec_params(value: Any) -> Any:
    """Refuse anything but flat scalar params, so that the union below never guesses and the hash stays exact."""
    if not isinstance(value, Mapping):
        return value  # let pydantic report the type error
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"parameter names must be non-empty strings, not {key!r}")
        if not isinstance(item, bool | int | float | str):
            raise ValueError(f"parameter {key!r} must be a number, string or boolean, not {type(item).__name__}")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"parameter {key!r} must be finite, not {item!r}")
    return value


_Optional = BeforeValidator(_none_word)
# Unknown keys are errors (a typo must not silently keep a default), values are immutable, and NaN or inf
# never reach a run: TOML and JSON can both spell them.
_FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(BaseModel):
    """Which network to train."""

    model_config = _FROZEN

    size: ModelSize = "tiny"
    # Context length in tokens; None keeps the size's own default. 8 is the smallest useful window,
    # 8192 bounds the attention memory a volunteer must hold.
    block_size: Annotated[Annotated[int, Field(ge=8, le=8192)] | None, _Optional] = None


class TaskSpec(BaseModel):
    """What the run trains (potluck.tasks): the built-in GPT family, a transformers causal LM, or your own task."""

    model_config = _FROZEN

    # "gpt" (the built-in family, sized by model.size), "hf-causal-lm" (any decoder-only model transformers
    # ships, from hf_config), or "package.module:attribute": a Task each volunteer imports from their own
    # Python installation. A run only names its task; no code ever travels with it.
    name: Annotated[str, AfterValidator(_check_task_name)] = "gpt"
    # A task of your own: the keyword arguments its attribute is called with.
    params: Annotated[dict[str, int | float | str | bool], BeforeValidator(_check_codec_params)] = Field(
        default_factory=dict
    )
    # hf-causal-lm: the model's transformers config ("model_type" and its fields), kept as canonical JSON text
    # (TOML has no null, and the run's hash must not depend on a round trip). run.toml may give a table or the
    # path of a config.json, read where the file is loaded (never from a config that came over the network).
    hf_config: Annotated[str | None, BeforeValidator(_hf_config_text), _Optional] = None  # "none" read first
    # sha256 over the model's parameter names, shapes and dtypes (potluck.tasks.base.architecture_fingerprint),
    # set when the run is created; a peer whose own build of the task differs is refused before it trains.
    fingerprint: Annotated[Annotated[str, AfterValidator(_check_sha256)] | None, _Optional] = None
    # The weights the run starts from instead of its seed's (continued pretraining, fine-tuning): the sha256 of
    # a safetensors file. run.toml may name a safetensors file or a save_pretrained / potluck export directory
    # instead: it is read and kept in this machine's store when the run is loaded (potluck.protocol.weights_files)
    # and loaded into the model when the run is created; every parameter must be there with its shape. Peers
    # receive the weights with the run's state and never need the file. None: the task's own initialisation.
    init_from: Annotated[Annotated[str, AfterValidator(_check_sha256)] | None, _Optional] = None

    def hf_config_values(self) -> dict[str, Any]:
        """The transformers config as a mapping (empty when the task is not hf-causal-lm)."""
        return {} if self.hf_config is None else dict(json.loads(self.hf_config))

    @model_validator(mode="after")
    def _fields_fit_the_task(self) -> TaskSpec:
        if (self.name == "hf-causal-lm") != (self.hf_config is not None):
            raise ValueError('task.hf_config is given exactly when task.name is "hf-causal-lm"')
        if self.params and self.name in BUILT_IN_TASKS:
            raise ValueError(f"task.params are a task of your own's; {self.name!r} takes none")
        return self


class DataSpec(BaseModel):
    """Where each peer's tokens come from."""

    model_config = _FROZEN

    # "builtin" (the Python standard library's own source, present on every install), a path to a
    # text file or directory, a .jsonl file (one JSON object a line) or a .parquet file (the text in
    # text_field), or "hf:<dir>" for a Hugging Face dataset saved on disk.
    source: Annotated[str, AfterValidator(check_data_source)] = "builtin"
    # The field of each .jsonl object, and the column of a .parquet file or saved dataset, that holds the text.
    text_field: Annotated[str, Field(max_length=256), AfterValidator(_check_text_field)] = "text"
    # Text held out for the validation loss, read from a source of its own (any kind source takes): all of
    # source is then training text, and every node scores on this. None: documents of source are held out.
    held_out_source: Annotated[Annotated[str, AfterValidator(check_data_source)] | None, _Optional] = None
    # Held-out share of source for validation loss, by document (unused with held_out_source).
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    # Read at most this many bytes of the source (None: all of it), and as many of held_out_source;
    # 4 MB keeps the builtin corpus quick.
    max_bytes: Annotated[Annotated[int, Field(gt=0)] | None, _Optional] = 4_000_000
    # The sha256 of the run's tokenizer.json (potluck tokenizer train makes one); None: a token is a byte.
    # run.toml may name the file instead: it is read and kept in this machine's store when the run is loaded
    # (potluck.tasks.tokens), and every node finds it there by this hash.
    tokenizer: Annotated[Annotated[str, AfterValidator(_check_sha256)] | None, _Optional] = None

    @model_validator(mode="after")
    def _held_out_is_not_trained_on(self) -> DataSpec:
        if self.held_out_source is not None and self.held_out_source.strip() == self.source.strip():
            raise ValueError(
                "data.held_out_source is data.source: the model would be scored on text it trains on; "
                "name another source, or leave held_out_source out to hold out documents of source"
            )
        return self


class InnerOptimizerSpec(BaseModel):
    """AdamW on each peer between synchronizations; cosine decay after warmup (He et al. 2024)."""

    model_config = _FROZEN

    lr: float = Field(3e-3, gt=0, le=1)  # peak learning rate
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)  # 0.95 rather than 0.999: steadier for LLM pretraining
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to 10% of the peak, as in the paper
    batch_size: int = Field(16, ge=1, le=4096)  # sequences per inner step on one peer
    grad_clip: Annotated[Annotated[float, Field(gt=0)] | None, _Optional] = 1.0  # max grad norm; None: no clip


class OuterOptimizerSpec(BaseModel):
    """The step applied to the averaged pseudo-gradient once per round (DiLoCo's outer optimizer)."""

    model_config = _FROZEN

    # "nesterov": SGD with Nesterov momentum (DiLoCo); "average": plain parameter averaging (lr 1, no momentum).
    kind: Literal["nesterov", "average"] = "nesterov"
    lr: float = Field(0.7, gt=0, le=10)  # DiLoCo's and He et al.'s tuned value
    # DiLoCo uses 0.9; with few inner steps and compressed updates 0.5 measured better than both 0.9 and
    # plain averaging (docs/experiments/simulate-sweeps.md): error feedback already carries momentum of its own.
    momentum: float = Field(0.5, ge=0, lt=1)


class CodecSpec(BaseModel):
    """A codec by registry name plus its parameters; the codec module validates the parameters itself."""

    model_config = _FROZEN

    name: Annotated[str, AfterValidator(_check_codec_name)] = "dct-topk"
    params: Annotated[dict[str, int | float | str | bool], BeforeValidator(_check_codec_params)] = Field(
        default_factory=dict
    )


class ValidationSpec(BaseModel):
    """Thresholds of the aggregator's checks (aggregator_server/validation.py and round_checks.py)."""

    model_config = _FROZEN

    # An update's timestamp may differ from the aggregator's clock by this much: volunteers' clocks drift,
    # so this only stops replays of long-gone updates; rounds and nonces do the fine work.
    timestamp_window_s: float = Field(900.0, gt=0)
    # Round-level checks, at round close: robust z-score of an update's norm against the round's median
    # (6 robust deviations is far outside honest spread), a norm under this fraction of the median (a free
    # rider), and the cosine with the median of the other updates (an update pointing away from the rest).
    max_norm_z: float = Field(6.0, gt=0)
    min_norm_ratio: float = Field(0.05, ge=0, lt=1)
    min_cosine: float = Field(0.0, ge=-1, le=1)
    min_updates: int = Field(4, ge=3)  # fewer updates in a round: no statistics, nothing rejected by them
    # Held-out-loss check, at round close after the others: each update is applied alone to the round's base
    # (outer lr, no momentum) and scored on the first held_out_batches held-out batches; it is rejected when
    # that loss is worse than the round's median update's by more than held_out_margin x the median update's
    # gain over the base (1.0: worse than not training at all). None: off (it costs one evaluation per update).
    held_out_margin: Annotated[Annotated[float, Field(gt=0)] | None, _Optional] = 1.0
    # ... but never by less than held_out_noise_z x the round's robust spread of those losses (1.4826 x MAD):
    # late in a run one update gains less than the noise of a few held-out batches, and without this floor an
    # honest update measured a thousandth of a nat worse than the base is rejected. 4: above the measured 99th
    # percentile of an honest update's robust z late in a run with 8 peers (3.99; 3.62 for Gaussian noise). 0: none.
    held_out_noise_z: float = Field(4.0, ge=0, allow_inf_nan=False)
    held_out_batches: int = Field(2, ge=1, le=64)
    # A key that takes this many strikes within ban_window_rounds rounds is banned for the run; one bad round
    # is a glitch, three in ten is a pattern. A check that proves misbehaviour strikes at once; the round-close
    # checks (norm, direction, held-out) strike only beyond chance (aggregator_server/strike_policy.py).
    ban_after_rejections: int = Field(3, ge=1)
    ban_window_rounds: int = Field(10, ge=1)


class AggregationSpec(BaseModel):
    """How the accepted updates of a round are combined (training/combine.py)."""

    model_config = _FROZEN

    # "mean": token-weighted mean; "trimmed-mean": coordinate-wise, trim_fraction cut at each end;
    # "centered-clip": CenteredClip (Karimireddy et al. 2021) with radius clip_tau_ratio x the round's
    # median update norm.
    kind: Literal["mean", "trimmed-mean", "centered-clip"] = "mean"
    trim_fraction: float = Field(0.25, ge=0, lt=0.5)
    clip_tau_ratio: float = Field(1.0, gt=0)
    clip_iterations: int = Field(3, ge=1, le=100)
    # A peer's weight is its tokens, capped at this multiple of the round's median claim (and at what the
    # config allows one peer to train in a round), so claiming 100x the tokens does not buy 100x the say.
    # None: no cap at all, claims are weights (the red team's undefended baseline; never for a real run).
    max_weight_ratio: Annotated[Annotated[float, Field(ge=1)] | None, _Optional] = 2.0


class RunConfig(BaseModel):
    """Every hyperparameter of one run. The canonical hash of this object is the run's identity."""

    model_config = _FROZEN

    run_name: Annotated[str, AfterValidator(_check_run_name)] = "potluck-default"
    task: TaskSpec = Field(default_factory=TaskSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    inner: InnerOptimizerSpec = Field(default_factory=InnerOptimizerSpec)
    outer: OuterOptimizerSpec = Field(default_factory=OuterOptimizerSpec)
    local_steps: int = Field(30, ge=1, le=100_000)  # H: inner steps per round
    rounds: int = Field(50, ge=1, le=10_000_000)  # planned rounds; the inner LR schedule spans rounds * local_steps
    codec: CodecSpec = Field(default_factory=CodecSpec)  # upload codec (peer -> aggregator)
    # Download codec (the aggregator re-encodes the mean); when left out it is the same as `codec`, or, when
    # both are left out, dct-topk at 4x the upload density: the mean of several peers' sparse updates has
    # up to that many coefficients, and 1/16 measured better than 1/64 for 0.07 B/param per round.
    aggregate_codec: CodecSpec = Field(default_factory=lambda: CodecSpec(params={"density": 1 / 16}))
    # Adaptive density (protocol/density.py): for a top-k upload codec the aggregator picks each round's
    # density from the codec's doubled up to this, the densest whose upload the peers' measured links carry
    # in a tenth of their compute (scaling efficiency K >= 0.9); the aggregate keeps its ratio to it. None,
    # or a value at or below the codec's density, keeps the codec's density for the whole run.
    max_density: Annotated[Annotated[float, Field(gt=0, le=1)] | None, _Optional] = 0.5
    round_deadline_s: float = Field(120.0, gt=0)  # a round closes at this deadline or at the token target
    # An update for round r that arrives while round r+1 is open (its peer missed the deadline): "reject"
    # refuses it (the peer folds it back into its next update); "discount" accepts it into round r+1 in
    # place of that peer's own round-r+1 update, its weight and credit times `late_discount`. Never later.
    late_updates: Literal["reject", "discount"] = "reject"
    late_discount: float = Field(0.5, gt=0, le=1)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    # Close the round once accepted updates carry this many tokens; None: at the deadline or when every
    # known peer has reported.
    target_tokens_per_round: Annotated[Annotated[int, Field(gt=0)] | None, _Optional] = None
    max_update_bytes: int = Field(64 * 2**20, gt=0)  # hard size limit of one uploaded update (64 MiB)
    # Ed25519 public keys whose signed aggregates peers accept. Empty: no aggregator is trusted, and the
    # swarm falls back to peer-to-peer averaging.
    aggregator_keys: Annotated[
        tuple[Annotated[str, AfterValidator(_check_aggregator_key)], ...], AfterValidator(_check_distinct)
    ] = ()
    # Cut the parameters into this many contiguous shards, each aggregated by its own aggregator
    # (protocol/shards.py): the k-th key in aggregator_keys owns shard k % shards, later keys are standbys.
    shards: int = Field(1, ge=1, le=64)
    seed: int = Field(0, ge=0, le=2**63 - 1)  # TOML integers are signed 64-bit

    @model_validator(mode="before")
    @classmethod
    def _aggregate_codec_defaults_to_codec(cls, data: Any) -> Any:
        """Copy `codec` into a missing `aggregate_codec`, but only a valid one, so an error is reported once."""
        if isinstance(data, Mapping) and "codec" in data and "aggregate_codec" not in data:
            try:
                CodecSpec.model_validate(data["codec"])
            except ValidationError:
                return data
            return {**data, "aggregate_codec": data["codec"]}
        return data

    @model_validator(mode="after")
    def _warmup_fits_in_the_run(self) -> RunConfig:
        """The inner LR schedule warms up, then decays over rounds * local_steps; warmup must fit inside it."""
        total = self.rounds * self.local_steps
        if self.inner.warmup_steps > total:
            raise ValueError(
                f"inner.warmup_steps ({self.inner.warmup_steps}) is longer than the whole run "
                f"(rounds x local_steps = {total}); lower it or plan more rounds"
            )
        return self

    @model_validator(mode="after")
    def _every_shard_has_a_key(self) -> RunConfig:
        """A sharded run lists at least one aggregator key per shard (none at all: no aggregator)."""
        check_shard_keys(self.aggregator_keys, self.shards)
        return self

    @property
    def config_hash(self) -> str:
        """The run's identity: sha256 hex of the canonical encoding (see the module function)."""
        return config_hash(self)

    def with_overrides(self, overrides: Mapping[str, Any], *, source: str = "<overrides>") -> RunConfig:
        """A copy with dotted fields replaced, e.g. ``{"inner.lr": 1e-3}``; raises ConfigError.

        `aggregate_codec` is already resolved here, so changing ``codec.*`` does not move it; to have it
        follow, apply the overrides to the raw mapping instead (``run_config_from_mapping(..., overrides=)``).
        """
        from potluck.protocol.config_files import run_config_from_mapping  # it imports this module

        return run_config_from_mapping(self.model_dump(), source=source, overrides=overrides)


class ConfigError(PotluckError):
    """An unusable run config: one line, ``<source>: <field.path>: <problem>``, problems joined with "; "."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = tuple(" ".join(p.split()) for p in problems)  # collapse any newline: one line, always
        super().__init__(f"{source}: " + "; ".join(self.problems))


def config_hash(cfg: RunConfig) -> str:
    """sha256 hex of the canonical JSON of `cfg`: sorted keys, no whitespace, ASCII only.

    JSON of plain values is stable across processes and Python versions (floats print with the
    shortest round-tripping repr since Python 3.1), which is what a run identity needs.
    """
    canonical = json.dumps(
        cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
