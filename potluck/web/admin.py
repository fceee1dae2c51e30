"""The status page's operator endpoints: ban, unban, close the round; off unless a token is configured.

The web layer only checks the bearer token and the request's shape; what a ban means is the
aggregator's business, reached through the small AdminActions interface it hands in.
"""

import hmac
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

DISABLED_DETAIL = "admin is disabled on this aggregator; start the aggregator with --admin-token-file to enable it"


class AdminActions(Protocol):
    """What the operator can ask the aggregator to do. Raise ValueError for a bad request, LookupError if unknown."""

    async def ban(self, peer: str, reason: str) -> dict[str, Any]:
        """Refuse `peer`'s (fingerprint or hex public key) updates from now on."""
        ...

    async def unban(self, peer: str) -> dict[str, Any]:
        """Accept `peer`'s updates again."""
        ...

    async def close_round(self) -> dict[str, Any]:
        """Close the open round now with the updates it has."""
        ...


class BanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    peer: str = Field(min_length=1, max_length=128, description="A fingerprint or a hex Ed25519 public key.")
    reason: str = Field(default="banned by the operator", max_length=500)


class UnbanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    peer: str = Field(min_length=1, max_length=128, description="A fingerprint or a hex Ed25519 public key.")


_bearer = HTTPBearer(auto_error=False, description="The aggregator's admin token (--admin-token-file).")


def admin_router(actions: AdminActions | None, *, token: str | None) -> APIRouter:
    """The /api/admin routes: 403 while disabled, 401 without the right `Authorization: Bearer` token."""
    expected = None if token is None or actions is None else token.encode()

    def enabled() -> AdminActions:
        """The actions, once `authorize` has let the request through (it refuses every request without them)."""
        assert actions is not None
        return actions

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        """Let the request through only with admin enabled and the right token, compared in constant time."""
        if expected is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=DISABLED_DETAIL)
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or wrong admin token; send it as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    router = APIRouter(prefix="/api/admin", tags=["admin"], dependencies=[Depends(authorize)])

    @router.post("/ban", summary="Ban a peer")
    async def ban(request: BanRequest) -> dict[str, Any]:
        """Refuse the peer's updates from now on."""
        return await _call(enabled().ban(request.peer, request.reason))

    @router.post("/unban", summary="Lift a peer's ban")
    async def unban(request: UnbanRequest) -> dict[str, Any]:
        """Accept the peer's updates again."""
        return await _call(enabled().unban(request.peer))

    @router.post("/close-round", summary="Close the open round now")
    async def close_round() -> dict[str, Any]:
        """Close the round being collected with the updates it holds."""
        return await _call(enabled().close_round())

    return router


async def _call(action: Any) -> dict[str, Any]:
    """Await an admin action, turning its refusals into 400 (bad request) and 404 (unknown peer)."""
    try:
        return await action
    except ValueError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=_message(e)) from None
    except LookupError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=_message(e)) from None


def _message(error: Exception) -> str:
    # str(KeyError("x")) is "'x'", so prefer the first argument when it is a message.
    return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
