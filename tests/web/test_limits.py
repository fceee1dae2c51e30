"""Request bodies are capped before anything reads them."""

from collections.abc import Iterator

import pytest

from potluck.web import RunStatus, create_app
from potluck.web.limits import MAX_BODY_BYTES
from tests.web.conftest import TestClient


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(RunStatus()))


def test_an_oversized_body_is_413(client: TestClient) -> None:
    # Execute
    response = client.post("/api/admin/ban", content=b"x" * (MAX_BODY_BYTES + 1))
    # Assert
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body over {MAX_BODY_BYTES} bytes"}


def test_a_body_without_a_length_is_411(client: TestClient) -> None:
    # Prepare
    def chunks() -> Iterator[bytes]:
        yield b'{"peer": "pl-x"}'

    # Execute
    response = client.post("/api/admin/ban", content=chunks())
    # Assert
    assert response.status_code == 411


def test_a_small_body_reaches_the_endpoint(client: TestClient) -> None:
    # Execute
    response = client.post("/api/admin/ban", json={"peer": "pl-x"})
    # Assert
    assert response.status_code == 403  # admin is off here: the body got through to the endpoint
