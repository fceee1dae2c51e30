"""/metrics speaks Prometheus's text format and carries the run's numbers."""

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from potluck.events import Credit
from potluck.web import RunStatus, create_app
from potluck.web.metrics import CONTENT_TYPE_LATEST, MAX_PEER_SERIES, make_registry, render
from tests.web.conftest import TestClient
from tests.web.events import ALICE, BOB, closed, ready


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each sample's value keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_carry_the_runs_numbers(client: TestClient) -> None:
    # Execute
    response = client.get("/metrics")
    # Assert
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    samples = _samples(response.text)
    assert samples[("potluck_round", ())] == 2
    assert samples[("potluck_rounds_closed_total", ())] == 2
    assert samples[("potluck_val_loss", ())] == 4.5
    assert samples[("potluck_tokens_per_second", ())] == pytest.approx(4096 / 50)
    assert samples[("potluck_round_seconds", ())] == 50
    assert samples[("potluck_seconds_to_deadline", ())] == pytest.approx(50)
    assert samples[("potluck_bytes_in_total", ())] == 200_000
    assert samples[("potluck_bytes_out_total", ())] == 600_000
    assert samples[("potluck_peers_active", ())] == 2
    assert samples[("potluck_peers_banned", ())] == 1
    assert samples[("potluck_updates_accepted_total", ())] == 3
    assert samples[("potluck_updates_rejected_total", (("check", "norm"),))] == 1
    assert samples[("potluck_peer_points", (("peer", ALICE),))] == 18
    assert samples[("potluck_peer_points", (("peer", BOB),))] == 4
    assert (
        samples[
            (
                "potluck_run_info",
                (
                    ("aggregate_codec", "int8"),
                    ("codec", "topk-int8"),
                    ("config_hash", "c0" * 32),
                    ("model", "gpt-tiny"),
                    ("run", "tiny-stdlib"),
                ),
            )
        ]
        == 1
    )


def test_unknown_values_have_no_sample_before_the_run_starts() -> None:
    # Prepare
    registry = make_registry(RunStatus())
    # Execute
    samples = _samples(render(registry).decode())
    # Assert
    assert ("potluck_val_loss", ()) not in samples and ("potluck_round", ()) not in samples
    assert samples[("potluck_bytes_in_total", ())] == 0


def test_two_apps_in_one_process_keep_their_own_metrics() -> None:
    # Prepare
    first, second = RunStatus(), RunStatus()
    first.handle(ready(round=3))
    second.handle(ready(round=9))
    # Execute
    rounds = [_samples(TestClient(create_app(s)).get("/metrics").text)[("potluck_round", ())] for s in (first, second)]
    # Assert
    assert rounds == [3, 9]


def test_peer_series_are_bounded_and_hostile_labels_escaped() -> None:
    # Prepare
    status = RunStatus()
    status.handle(ready(leaderboard=()))
    crowd = [f'pl-"evil"\n{i}' for i in range(MAX_PEER_SERIES + 50)]
    credits = tuple(Credit(fingerprint=who, public_key="00", credit=float(i)) for i, who in enumerate(crowd))
    event = dataclasses.replace(closed(0, accepted=[], val_loss=5.0), credits=credits)
    # Execute
    status.handle(event)
    samples = _samples(render(make_registry(status)).decode())
    # Assert
    points = {labels[0][1]: v for (name, labels), v in samples.items() if name == "potluck_peer_points"}
    assert len(points) == MAX_PEER_SERIES
    assert points[crowd[-1]] == MAX_PEER_SERIES + 49  # the top scorer, its label round-tripped intact


def test_metrics_carry_the_standard_process_metrics(client: TestClient) -> None:
    # Execute
    samples = _samples(client.get("/metrics").text)
    # Assert
    names = {name for name, _ in samples}
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("process_open_fds", ())] > 0
    assert "process_cpu_seconds_total" in names
    assert any(name == "python_info" for name in names)
