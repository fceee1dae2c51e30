"""What tests/unit/test_forkserver.py forks: reports where it runs, then exits as its arguments say."""

import contextlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path


def autogroup_nice() -> int | None:
    """This process's autogroup nice value ("/autogroup-N nice X"); None where the kernel has no autogroups."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path("/proc/self/autogroup").read_text().split()[-1])
    return None


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "report"
    print(
        json.dumps(
            {
                "argv": sys.argv[1:],
                "cwd": os.getcwd(),
                "env": os.environ.get("FORKSERVER_TEST"),
                "pid": os.getpid(),
                "sid": os.getsid(0),
                "random": random.random(),
                "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "autogroup_nice": autogroup_nice(),
            }
        ),
        flush=True,
    )
    print("to the log", file=sys.stderr, flush=True)
    if command == "exit":
        sys.exit(int(sys.argv[2]))
    if command == "crash":
        raise RuntimeError("boom")
    if command == "hang":
        while True:
            time.sleep(1)
