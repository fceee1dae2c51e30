"""Your own training loop next to a CLI peer: a plain PyTorch loop over a transformers Llama, wrapped in
potluck.Optimizer, joins an aggregator; both peers' updates are accepted and the held-out loss falls."""

import sys
import threading
from pathlib import Path

import pytest

from potluck.lab.children import start_child
from tests.integration.swarm_helpers import Node, Nodes, _pump

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 4


@pytest.mark.timeout(300)
def test_a_plain_pytorch_loop_trains_in_a_run_next_to_a_cli_peer(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: the example Llama run, shortened
    settings = {"rounds": ROUNDS, "local_steps": 8, "round_deadline_s": 60, "inner.warmup_steps": 4}
    run = ("--config", str(ROOT / "examples" / "llama" / "run.toml"), "--wait-for-peers", "2")
    aggregator = nodes.aggregator(extra=run, **settings)
    join = aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=120)["maddrs"][0]
    # Execute: the own-loop example and a CLI peer
    script = [sys.executable, str(ROOT / "examples" / "own_loop" / "train.py"), "--join", join]
    script += ["--identity", str(tmp_path / "own.key"), "--receipts", str(tmp_path / "own-receipts")]
    child = start_child("own-loop", [], work_dir=tmp_path, threads=1, wrap=lambda argv: script)
    own = Node(child=child)
    threading.Thread(target=_pump, args=(child, own.events), daemon=True).start()
    nodes.started.append(own)
    nodes.peer("cli", join)
    closed = [
        aggregator.next_event(lambda e, r=r: e.get("event") == "round" and e["round"] == r, timeout_s=180)
        for r in range(ROUNDS)
    ]
    # Assert: every round counts both peers' updates, and the run learns
    credited = [{a["fingerprint"] for a in r["accepted"]} for r in closed]
    assert all(len(c) == 2 for c in credited), credited
    assert closed[-1]["val_loss"] < closed[0]["val_loss"] - 0.5, [r["val_loss"] for r in closed]
    own_rounds = [e for e in own.all_events(timeout_s=120) if e.get("event") == "round"]
    assert [e["round"] for e in own_rounds if e["accepted"]] == list(range(ROUNDS)), own_rounds
    assert own.wait_exit(timeout_s=60) == 0
