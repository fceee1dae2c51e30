"""The JSON the status API serves, as pydantic models: they document /openapi.json and check every reply."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Health(_Reply):
    ok: bool
    phase: str
    round: int | None


class JoinReply(_Reply):
    run: str | None
    fingerprint: str | None = Field(description="The aggregator's fingerprint.")
    maddrs: list[str] = Field(description="The aggregator's multiaddrs, each ending in /p2p/<peer id>.")


class LossPoint(_Reply):
    round: int = Field(description="The closed round; the starting state is the round before the first one (-1).")
    val_loss: float


class ErrorNote(_Reply):
    round: int | None
    detail: str
    time_s: float


class RunStatusReply(_Reply):
    run: str | None
    config_hash: str | None
    fingerprint: str | None = Field(description="The aggregator's fingerprint.")
    model: str | None
    num_params: int | None
    codec: str | None
    aggregate_codec: str | None
    resumed: bool
    state_sha256: str | None
    phase: Literal["starting", "collecting", "finished"]
    round: int | None = Field(description="The round being collected (0-based).")
    rounds_total: int | None
    rounds_closed: int
    round_deadline_s: float | None
    seconds_to_deadline: float | None
    val_loss: float | None
    loss_history: list[LossPoint]
    tokens_per_s: float | None = Field(description="Tokens aggregated per second of the last closed round.")
    tokens_per_s_recent: float | None = Field(description="The same over the last few rounds.")
    round_s: float | None
    bytes_in: int = Field(description="Bytes received since start.")
    bytes_out: int = Field(description="Bytes sent since start.")
    updates_accepted: int
    updates_rejected: int
    rejected_by_check: dict[str, int]
    peers_active: int
    peers_known: int
    peers_banned: int
    maddrs: list[str]
    join_command: str | None
    last_error: ErrorNote | None


class Rejection(_Reply):
    round: int | None
    check: str | None
    reason: str | None


class PeerReply(_Reply):
    fingerprint: str
    status: Literal["active", "idle", "banned"]
    last_seen_s: float = Field(description="Unix time of its latest upload, acceptance or rejection.")
    last_round: int | None
    rounds_contributed: int
    uploads: int
    accepted: int
    rejected: int
    bytes_received: int
    tokens_per_s: float | None
    last_rejection: Rejection | None
    banned: bool
    ban_reason: str | None
    points: float | None
    client_mode: str | None


class RoundReply(_Reply):
    round: int
    closed_by: str | None
    val_loss: float | None
    accepted: int
    rejected: int
    tokens: int
    tokens_per_s: float | None
    round_s: float | None
    aggregation_s: float | None
    aggregate_bytes: int | None
    state_sha256: str | None
    time_s: float


class StandingReply(_Reply):
    rank: int
    fingerprint: str
    public_key: str | None
    points: float
    accepted: int


class RejectionReply(Rejection):
    fingerprint: str | None
    update: str | None
    time_s: float


class LedgerHead(BaseModel):
    """The ledger's signed chain head, passed through as the aggregator reported it."""

    model_config = ConfigDict(extra="allow")

    round: int | None = None
    last_row_id: int | None = None
    head_hash: str | None = None
    row_count: int | None = None
    timestamp_s: float | None = None
    aggregator_public_key: str | None = None
    signature: str | None = None
