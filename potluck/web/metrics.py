"""Prometheus exposition of a RunStatus, read at scrape time.

Each app gets its own CollectorRegistry rather than prometheus_client's global one, so that
several apps (an aggregator and a peer, or many tests) can live in one process.
"""

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from potluck.web.status import RunStatus

# Peers labelled in potluck_peer_points: the top of the leaderboard. Each label value is a series in
# the scraper's database, so this keeps a flood of fresh keys from flooding Prometheus too.
MAX_PEER_SERIES = 100

__all__ = ["CONTENT_TYPE_LATEST", "MAX_PEER_SERIES", "RunStatusCollector", "make_registry", "render"]


class RunStatusCollector(Collector):
    """Turns the status snapshots into metric families each time Prometheus scrapes."""

    def __init__(self, status: RunStatus) -> None:
        """Read `status` at every scrape; nothing is cached between scrapes."""
        self._status = status

    def collect(self) -> Iterator[Metric]:
        """The run's gauges and counters, labelled where a breakdown helps (check, peer)."""
        s = self._status.status()
        info = {k: str(s[k]) for k in ("run", "config_hash", "model", "codec", "aggregate_codec") if s[k] is not None}
        if info:
            yield InfoMetricFamily("potluck_run", "The run this aggregator serves.", value=info)
        yield _gauge("potluck_round", "The round being collected.", s["round"])
        yield _gauge("potluck_rounds_planned", "Rounds the run is configured for.", s["rounds_total"])
        yield CounterMetricFamily("potluck_rounds_closed", "Rounds closed since start.", value=s["rounds_closed"])
        yield _gauge("potluck_val_loss", "Held-out loss after the latest closed round.", s["val_loss"])
        yield _gauge("potluck_tokens_per_second", "Tokens the last round aggregated per second.", s["tokens_per_s"])
        yield _gauge("potluck_round_seconds", "How long the last closed round took.", s["round_s"])
        yield _gauge("potluck_seconds_to_deadline", "Seconds until the open round closes.", s["seconds_to_deadline"])
        yield CounterMetricFamily("potluck_bytes_in", "Bytes received since start.", value=s["bytes_in"])
        yield CounterMetricFamily("potluck_bytes_out", "Bytes sent since start.", value=s["bytes_out"])
        yield _gauge("potluck_peers_active", "Peers that uploaded for one of the latest rounds.", s["peers_active"])
        yield _gauge("potluck_peers_known", "Peers seen since start (bounded).", s["peers_known"])
        yield _gauge("potluck_peers_banned", "Known peers currently banned.", s["peers_banned"])
        yield CounterMetricFamily(
            "potluck_updates_accepted", "Updates that made it into an aggregate.", value=s["updates_accepted"]
        )
        rejected = CounterMetricFamily(
            "potluck_updates_rejected", "Updates rejected, by the check that refused them.", labels=["check"]
        )
        for check, count in sorted(s["rejected_by_check"].items()):
            rejected.add_metric([check], count)
        yield rejected
        points = GaugeMetricFamily("potluck_peer_points", "Leaderboard points of the top peers.", labels=["peer"])
        for entry in self._status.leaderboard(limit=MAX_PEER_SERIES):
            points.add_metric([entry["fingerprint"]], entry["points"])
        yield points


def _gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    """A gauge with no sample while the value is unknown (before the first round, say)."""
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


def make_registry(status: RunStatus) -> CollectorRegistry:
    """A fresh registry holding `status`'s collector and the standard process, platform and GC metrics
    (resident memory, open descriptors, CPU seconds, Python version), as the global registry would."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunStatusCollector(status))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus's text format; serve it with CONTENT_TYPE_LATEST."""
    return generate_latest(registry)
