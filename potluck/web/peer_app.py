"""The peer's own small status page: JSON about this volunteer's work, and a page that shows it."""

from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from potluck.web.app import PAGE_HEADERS, STATIC_DIR, package_version
from potluck.web.limits import BodyLimit
from potluck.web.peer_status import PeerStatus


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PeerHealth(_Reply):
    ok: bool
    phase: str
    round: int | None


class LocalLoss(_Reply):
    round: int | None
    loss: float


class OwnRejection(_Reply):
    round: int | None
    reason: str | None


class PeerStatusReply(_Reply):
    fingerprint: str | None
    run: str | None
    aggregator: str | None
    phase: str
    round: int | None
    loss: float | None
    loss_history: list[LocalLoss]
    tokens_per_s: float | None
    bytes_up: int
    bytes_down: int
    state_bytes: int
    state_bytes_served: int
    rounds_done: int
    accepted: int
    rejected: int
    receipts: int
    score_total: float
    tokens_credited: int
    last_rejection: OwnRejection | None
    state_refusals: int
    finished: bool
    detail: str | None


def create_peer_app(status: PeerStatus) -> FastAPI:
    """The peer's web app, read-only: /api/health, /api/status and a page at /."""
    app = FastAPI(
        title="potluck peer",
        version=package_version(),
        description="One potluck volunteer's work, as its peer sees it.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit)
    index_html = (STATIC_DIR / "peer.html").read_text(encoding="utf-8")

    @app.get("/api/health", summary="Liveness", response_model=PeerHealth)
    def health() -> dict[str, Any]:
        """Whether the page is up, with the peer's phase and round."""
        s = status.status()
        return {"ok": True, "phase": s["phase"], "round": s["round"]}

    @app.get("/api/status", summary="This peer's work", response_model=PeerStatusReply)
    def peer_status() -> dict[str, Any]:
        """Run, round, local loss, speed, traffic, accepted and rejected updates, receipts earned."""
        return status.status()

    @app.get("/", summary="The peer's page", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        """A small page that polls /api/status."""
        return HTMLResponse(index_html, headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
