"""The aggregator's status page: JSON API, Prometheus /metrics and a dashboard, all read from a RunStatus."""

from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from potluck.web.admin import AdminActions, admin_router
from potluck.web.limits import BodyLimit
from potluck.web.metrics import CONTENT_TYPE_LATEST, make_registry, render
from potluck.web.schemas import (
    Health,
    JoinReply,
    LedgerHead,
    PeerReply,
    RejectionReply,
    RoundReply,
    RunStatusReply,
    StandingReply,
)
from potluck.web.status import MAX_PEERS, MAX_REJECTIONS, MAX_ROUNDS, MAX_STANDINGS, RunStatus

STATIC_DIR = Path(__file__).parent / "static"

# The dashboard loads nothing but its own files, so the browser may refuse everything else: a
# string from a hostile peer that slipped into the page could still not load or send anything.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def package_version() -> str:
    """potluck's installed version, for the API's OpenAPI description."""
    try:
        return metadata.version("potluck")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(status: RunStatus, *, admin: AdminActions | None = None, admin_token: str | None = None) -> FastAPI:
    """The aggregator's web app. Read-only unless both `admin` and `admin_token` are given."""
    if admin_token is not None and admin is None:
        raise ValueError("an admin token needs the aggregator's admin actions; pass admin= as well")
    if admin_token is not None and not admin_token.strip():
        raise ValueError("the admin token is empty; put a long random string in the --admin-token-file")
    app = FastAPI(
        title="potluck status",
        version=package_version(),
        description="A potluck training run as its aggregator sees it.",
        docs_url=None,  # FastAPI's docs pages load their scripts from a CDN; the page must work offline
        redoc_url=None,
    )
    app.add_middleware(BodyLimit)
    registry = make_registry(status)
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    app.include_router(status_router(status))

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        """The run's gauges and counters in Prometheus's text format."""
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", summary="The dashboard", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        """The dashboard page; it polls the JSON API from the browser."""
        return HTMLResponse(index_html, headers=PAGE_HEADERS)

    app.include_router(admin_router(admin, token=admin_token))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def status_router(status: RunStatus) -> APIRouter:
    """The read-only JSON API: health, how to join, the run, its peers, rounds, standings, rejections, ledger head."""
    router = APIRouter()

    @router.get("/api/health", summary="Liveness", response_model=Health)
    def health() -> dict[str, Any]:
        """Whether the page is up, with the run's phase and round."""
        s = status.status()
        return {"ok": True, "phase": s["phase"], "round": s["round"]}

    @router.get(
        "/api/join",
        summary="How to join: the aggregator's multiaddrs",
        response_model=JoinReply,
        responses={503: {"description": "The aggregator is not serving yet."}},
    )
    def join() -> dict[str, Any]:
        """What `peer --join http://HOST:PORT` reads, so that nobody has to copy a multiaddr by hand."""
        reply = status.join()
        if reply is None:
            raise HTTPException(503, detail="the aggregator is starting; its multiaddrs are not known yet")
        return reply

    @router.get("/api/status", summary="The run at a glance", response_model=RunStatusReply)
    def run_status() -> dict[str, Any]:
        """Round and countdown, held-out loss history, throughput, traffic, peers, how to join."""
        return status.status()

    @router.get("/api/peers", summary="Known peers, most recently seen first", response_model=list[PeerReply])
    def peers(limit: Annotated[int, Query(ge=1, le=MAX_PEERS)] = 500) -> list[dict[str, Any]]:
        """Each peer's activity, verdict counts, last rejection and ban."""
        return status.peers(limit)

    @router.get("/api/rounds", summary="Closed rounds, newest first", response_model=list[RoundReply])
    def rounds(limit: Annotated[int, Query(ge=1, le=MAX_ROUNDS)] = 50) -> list[dict[str, Any]]:
        """Each closed round's summary: why it closed, loss, updates, tokens, timings."""
        return status.rounds(limit)

    @router.get("/api/leaderboard", summary="Peers ranked by points", response_model=list[StandingReply])
    def leaderboard(limit: Annotated[int, Query(ge=1, le=MAX_STANDINGS)] = 100) -> list[dict[str, Any]]:
        """The ledger's points per peer, best first."""
        return status.leaderboard(limit)

    @router.get("/api/rejections", summary="Rejected updates, newest first", response_model=list[RejectionReply])
    def rejections(limit: Annotated[int, Query(ge=1, le=MAX_REJECTIONS)] = 50) -> list[dict[str, Any]]:
        """Recent rejections with the check that refused each update and why."""
        return status.rejections(limit)

    @router.get(
        "/api/ledger/head",
        summary="The ledger's signed chain head",
        response_model=LedgerHead,
        responses={404: {"description": "No round has been booked yet."}},
    )
    def ledger_head() -> dict[str, Any]:
        """The latest signed head; compare it with `potluck ledger verify` to check the ledger."""
        head = status.ledger_head()
        if head is None:
            raise HTTPException(404, detail="no ledger head yet: the aggregator reports one once a round has closed")
        return head

    return router
