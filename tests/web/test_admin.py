"""The operator endpoints: off without a token, 401 without the right one, and refusals mapped to 400/404."""

from typing import Any

import pytest

from potluck.web import RunStatus, create_app
from potluck.web.admin import DISABLED_DETAIL
from tests.web.conftest import TestClient

TOKEN = "s3cret-token-of-some-length"


class RecordingAdmin:
    """The aggregator's side of the admin endpoints, recording calls; `refuse` makes the next call raise it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: Exception | None = None

    async def _answer(self, *call: Any) -> dict[str, Any]:
        self.calls.append(call)
        if self.refuse is not None:
            raise self.refuse
        return {"ok": True, "did": call[0]}

    async def ban(self, peer: str, reason: str) -> dict[str, Any]:
        return await self._answer("ban", peer, reason)

    async def unban(self, peer: str) -> dict[str, Any]:
        return await self._answer("unban", peer)

    async def close_round(self) -> dict[str, Any]:
        return await self._answer("close_round")


@pytest.fixture
def admin() -> RecordingAdmin:
    return RecordingAdmin()


@pytest.fixture
def admin_client(admin: RecordingAdmin) -> TestClient:
    return TestClient(create_app(RunStatus(), admin=admin, admin_token=TOKEN))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("with_actions", [False, True])
def test_admin_is_disabled_without_a_token(with_actions: bool) -> None:
    # Prepare
    admin = RecordingAdmin()
    client = TestClient(create_app(RunStatus(), admin=admin if with_actions else None))
    # Execute
    response = client.post("/api/admin/close-round", headers=_bearer(TOKEN))
    # Assert
    assert response.status_code == 403
    assert response.json()["detail"] == DISABLED_DETAIL and "--admin-token-file" in DISABLED_DETAIL
    assert admin.calls == []


def test_a_token_without_actions_is_a_wiring_mistake() -> None:
    # Execute, Assert
    with pytest.raises(ValueError, match="admin="):
        create_app(RunStatus(), admin_token=TOKEN)
    with pytest.raises(ValueError, match="empty"):
        create_app(RunStatus(), admin=RecordingAdmin(), admin_token="  ")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        _bearer("wrong"),
        _bearer(TOKEN + "x"),
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer ünïcode".encode()},
    ],
    ids=["missing", "wrong", "longer", "not-bearer", "unicode"],
)
def test_a_missing_or_wrong_token_is_401(
    admin_client: TestClient, admin: RecordingAdmin, headers: dict[str, str | bytes]
) -> None:
    # Execute
    response = admin_client.post("/api/admin/ban", json={"peer": "pl-x"}, headers=headers)
    # Assert
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert admin.calls == []


def test_the_right_token_reaches_the_aggregators_actions(admin_client: TestClient, admin: RecordingAdmin) -> None:
    # Execute
    ban = admin_client.post("/api/admin/ban", json={"peer": "pl-mall", "reason": "spam"}, headers=_bearer(TOKEN))
    unban = admin_client.post("/api/admin/unban", json={"peer": "pl-mall"}, headers=_bearer(TOKEN))
    close = admin_client.post("/api/admin/close-round", headers=_bearer(TOKEN))
    # Assert
    assert [r.status_code for r in (ban, unban, close)] == [200, 200, 200]
    assert ban.json() == {"ok": True, "did": "ban"}
    assert admin.calls == [("ban", "pl-mall", "spam"), ("unban", "pl-mall"), ("close_round",)]


@pytest.mark.parametrize(
    ("error", "status_code", "detail"),
    [(ValueError("no round is open"), 400, "no round is open"), (KeyError("no peer pl-zz"), 404, "no peer pl-zz")],
)
def test_refusals_become_400_and_404_with_their_message(
    admin_client: TestClient, admin: RecordingAdmin, error: Exception, status_code: int, detail: str
) -> None:
    # Prepare
    admin.refuse = error
    # Execute
    response = admin_client.post("/api/admin/unban", json={"peer": "pl-zz"}, headers=_bearer(TOKEN))
    # Assert
    assert response.status_code == status_code
    assert response.json() == {"detail": detail}


@pytest.mark.parametrize(
    "body",
    [{"peer": ""}, {"peer": "p" * 129}, {"peer": "pl-x", "reason": "r" * 501}, {"peer": "pl-x", "extra": 1}, {}],
    ids=["empty-peer", "long-peer", "long-reason", "extra-field", "no-peer"],
)
def test_bodies_are_bounded(admin_client: TestClient, admin: RecordingAdmin, body: dict[str, object]) -> None:
    # Execute
    response = admin_client.post("/api/admin/ban", json=body, headers=_bearer(TOKEN))
    # Assert
    assert response.status_code == 422
    assert admin.calls == []


def test_an_unauthenticated_bad_body_gets_401_not_422(admin_client: TestClient) -> None:
    # Execute
    response = admin_client.post("/api/admin/ban", json={"peer": ""})
    # Assert
    assert response.status_code == 401
