"""The chaos soak's plan: what one run does, and the seeded schedule of kills and restarts (see bench/chaos.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What one soak does; `calm()` is the same run with nothing done to it."""

    peers: int = 8
    rounds: int = 30
    seed: int = 0
    peer_kills: int = 6
    aggregator_restarts: int = 2
    takeover: bool = True
    full_disk: bool = True
    deadline_s: float = 20.0
    local_steps: int = 3
    failover_after_s: float = 30.0  # the standby's: longer than a restart takes, so only the last kill hands over
    fsize_bytes: int = 64  # the full disk: a receipt is a few hundred bytes
    timeout_s: float = 1500.0
    # Once the last round closed, how long peers may take to leave; a peer a round behind then retries its upload
    # to an aggregator that has left, for up to its --reconnect-timeout: it is stopped, and listed as lingering.
    end_grace_s: float = 60.0

    def calm(self) -> Plan:
        """The same run, seeds and keys, with no kill, no restart, no full disk."""
        return replace(self, peer_kills=0, aggregator_restarts=0, takeover=False, full_disk=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class Action:
    """One thing the schedule does: `delay_s` after round `round` opens (the previous round's close); to the
    aggregator, `delay_s` after it accepted the round's first upload."""

    round: int
    kind: str  # kill-peer, restart-peer, kill-aggregator (restarted at once), takeover (killed for good)
    target: str
    delay_s: float


def schedule(plan: Plan) -> list[Action]:
    """The seeded chaos schedule: spread aggregator kills, a takeover near the end, random peer kills."""
    rng = random.Random(plan.seed)
    last = plan.rounds - 3  # the last round anything is done in: the run must end calm enough to be judged
    # the take-over three quarters in, so that rounds under the standby (and peers rejoining it) follow
    handover = max(2, min(last, (3 * plan.rounds) // 4)) if plan.takeover else last + 1
    actions: list[Action] = []
    for k in range(plan.aggregator_restarts):  # spread over [2, handover): mid-round, uploads in flight
        r = 2 + (k + 1) * (handover - 2) // (plan.aggregator_restarts + 1) + rng.randint(-1, 1)
        actions.append(
            Action(
                round=max(1, min(r, handover - 1)),
                kind="kill-aggregator",
                target="aggregator",
                delay_s=rng.uniform(0.3, 1.5),
            )
        )
    if plan.takeover:
        actions.append(Action(round=handover, kind="takeover", target="aggregator", delay_s=rng.uniform(0.3, 1.5)))
    killable = [f"peer-{i}" for i in range(plan.peers - (1 if plan.full_disk else 0))]
    down_until: dict[str, int] = {}
    for _ in range(plan.peer_kills if killable else 0):
        r = rng.randint(1, max(1, last - 1))
        up = [p for p in killable if down_until.get(p, -1) < r]
        if not up:
            continue
        peer = rng.choice(up)
        back = min(r + rng.randint(1, 3), plan.rounds - 2)
        down_until[peer] = back
        actions.append(Action(round=r, kind="kill-peer", target=peer, delay_s=rng.uniform(0.0, 2.0)))
        actions.append(Action(round=back, kind="restart-peer", target=peer, delay_s=0.0))
    return sorted(actions, key=lambda a: (a.round, a.delay_s))
