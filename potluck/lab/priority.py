"""Lowering a local swarm child's CPU priority, so that one box's aggregator is not starved by its peers.

On one machine an aggregator shares the cores with every peer's training, yet its round close (the
checks, the aggregate, the checkpoint) is on every peer's critical path: each core-second it loses to a
peer's inner steps delays the whole swarm's next round. Volunteers' peers run on machines of their own;
`potluck swarm` approximates that by running its peers at a lower priority than its aggregators.

Linux's autogroup scheduling (on by default in most distributions) makes every session one scheduling
group and ranks groups by the group's own nice value; a process's nice only ranks it within its group.
A swarm child runs in a session of its own, so both are set.
"""

import contextlib
import os
from pathlib import Path


def lower_priority(nice: int, pid: int = 0) -> bool:
    """Raise the nice value of process `pid` (0: this one) and of its autogroup to `nice`; whether either took.

    Never raises priority (a process already nicer keeps its value). Best effort: where the platform has
    neither, priority stays as it was and the swarm only runs slower.
    """
    if nice <= 0:
        return False
    took = False
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no setpriority off Unix
        nice = max(nice, os.getpriority(os.PRIO_PROCESS, pid))
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        took = True
    with contextlib.suppress(OSError):  # no autogroup file: a kernel without it, or not Linux
        Path(f"/proc/{pid or 'self'}/autogroup").write_text(str(nice))
        took = True
    return took
