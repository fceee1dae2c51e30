"""Fixtures of the multi-process tests (defined in swarm_helpers, shared here)."""

from tests.integration.swarm_helpers import nodes

__all__ = ["nodes"]
