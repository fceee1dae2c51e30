"""The chaos soak's end checks (ledgers, receipts, nothing acknowledged lost, stalls), its result and summary.

See bench/chaos.py.

Each check reads only what a run leaves on disk (the aggregators' ledgers, the receipts the peers kept)
and what the peers printed (their acknowledgements), so it says what an operator or a volunteer could
check after the fact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potluck.incentives.ledger import Ledger
from potluck.incentives.merkle import merkle_root
from potluck.incentives.receipts import verify_receipts
from potluck.protocol.envelope import MAX_AGGREGATE_ENVELOPE_BYTES, SignedAggregate
from potluck.protocol.identity import fingerprint, public_key_to_hex

if TYPE_CHECKING:
    from bench.chaos import Soak
    from bench.chaos_plan import Action
    from potluck.events import AggregatorReady

VERIFY_TIMEOUT_S = 120.0
STALL_GRACE_S = 10.0  # a round's close may run this far past its deadline (aggregation, the ledger, a busy box)
LOSS_BAR = 1.05  # the chaos run's final held-out loss over the calm run's


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack:
    """An update a peer was told was accepted: on upload (`upload`) or by a verified final receipt (`final`)."""

    peer: str
    round: int
    update: str  # the digest's first 16 hex digits, as the peer prints it
    kind: str  # "upload" or "final"


def ledger_verify(state_dir: Path, key: bytes) -> dict[str, Any]:
    """`potluck ledger verify --state-dir DIR --key KEY --json`, as an operator runs it; its JSON and exit status."""
    command = [sys.executable, "-m", "potluck", "ledger", "verify", "--state-dir", str(state_dir), "--json"]
    done = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [*command, "--key", public_key_to_hex(key)], capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S
    )
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"ok": False, "message": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"state_dir": str(state_dir), "exit": done.returncode, **report}


def _rows_by_round(ledgers: Iterable[Path]) -> dict[tuple[bytes, int], list[tuple[bytes, bool]]]:
    """(aggregator key, round) -> (update digest, accepted) of each of that round's rows, from each ledger."""
    found: dict[tuple[bytes, int], list[tuple[bytes, bool]]] = {}
    for path in ledgers:
        with Ledger.open(path, read_only=True) as ledger:
            heads = ledger.heads()
            if not heads:
                continue
            key = heads[0].aggregator_public_key
            for row in ledger.rows():
                found.setdefault((key, row.round), []).append((row.entry.update_digest, bool(row.entry.accepted)))
    return found


def check_receipts(receipt_dirs: Iterable[Path], keys: Iterable[bytes]) -> dict[str, Any]:
    """Every receipt kept, verified offline against the run's aggregator keys (`potluck receipts verify`)."""
    trusted = set(keys)
    checked, bad = 0, []
    for directory in receipt_dirs:
        if not directory.is_dir():
            continue
        for check in verify_receipts(directory, aggregator_keys=trusted):
            checked += 1
            if check.problem is not None:
                bad.append(f"{check.path}: {check.problem}")
    return {"checked": checked, "bad": bad}


def check_merkle(receipt_dirs: Iterable[Path], ledgers: Iterable[Path]) -> dict[str, Any]:
    """Each signed aggregate a peer kept: its `updates_root` is the Merkle root of its round's accepted ledger rows."""
    accepted = {where: [d for d, ok in rows if ok] for where, rows in _rows_by_round(ledgers).items()}
    seen: set[tuple[bytes, int]] = set()
    mismatched = []
    for directory in receipt_dirs:
        for path in sorted(directory.glob("*/aggregate-*.bin")):
            data = path.read_bytes()
            if len(data) > MAX_AGGREGATE_ENVELOPE_BYTES:
                mismatched.append(f"{path}: too large to be an aggregate")
                continue
            header = SignedAggregate.from_bytes(data).header
            where = (header.aggregator_public_key, header.round)
            if where in seen:
                continue
            seen.add(where)
            rows = accepted.get(where)
            if rows is None or merkle_root(rows) != header.updates_root:
                who = fingerprint(header.aggregator_public_key)
                mismatched.append(
                    f"round {header.round} of {who}: the ledger's accepted rows are not its updates_root"
                )
    return {"aggregates_checked": len(seen), "mismatched": mismatched}


def check_acknowledged(acks: Iterable[Ack], ledgers: Iterable[Path]) -> dict[str, Any]:
    """Every acknowledged update is in a ledger: a final receipt's as an accepted row of its round, an upload's
    as a row (the round's close may still reject it) of its round or, taken late, a later one."""
    rounds_of: dict[str, list[tuple[int, bool]]] = {}
    for (_, r), rows in _rows_by_round(ledgers).items():
        for digest, ok in rows:
            rounds_of.setdefault(digest.hex()[:16], []).append((r, ok))
    counted: dict[str, int] = {"upload": 0, "final": 0}
    lost = []
    for ack in acks:
        counted[ack.kind] += 1
        rounds = rounds_of.get(ack.update, [])
        if ack.kind == "final":
            in_place = (ack.round, True) in rounds
        else:
            in_place = any(r >= ack.round for r, _ in rounds)
        if not in_place:
            lost.append(f"{ack.peer} round {ack.round} update {ack.update} ({ack.kind} ack)")
    return {"upload_acks": counted["upload"], "final_receipts": counted["final"], "lost": lost}


def compare(calm: dict[str, Any], chaos: dict[str, Any]) -> dict[str, Any]:
    """The two runs side by side; `ok` when both passed their checks and chaos's loss is within LOSS_BAR of calm's."""
    ratio = None
    if calm["final_val_loss"] and chaos["final_val_loss"] is not None:
        ratio = chaos["final_val_loss"] / calm["final_val_loss"]
    return {
        "calm_final_val_loss": calm["final_val_loss"],
        "chaos_final_val_loss": chaos["final_val_loss"],
        "loss_ratio": ratio,
        "ok": bool(calm["ok"] and chaos["ok"] and ratio is not None and ratio <= LOSS_BAR),
    }


def summary(calm: dict[str, Any], chaos: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    """A few lines for a person."""
    c, acked = chaos["counts"], chaos["acknowledged"]
    lines = [
        f"rounds: calm {calm['rounds_completed']}, chaos {chaos['rounds_completed']} of {chaos['plan']['rounds']}",
        f"chaos: {c['peer_kills']} peer kills, {c['peer_restarts']} peer restarts, {c['aggregator_kills']} aggregator "
        f"kill -9 ({c['aggregator_restarts']} restarted), takeover at round {chaos['takeover_round']}",
        f"stalls: {len(chaos['stalls'])} (max round {chaos['max_round_s']} s, "
        f"deadline {chaos['plan']['deadline_s']} s); "
        f"crashes: {len(chaos['crashes'])}",
        "ledgers: "
        + ", ".join(
            f"{Path(v['state_dir']).name} {'ok' if v['ok'] else 'BAD'} ({v.get('rows_checked')} rows, "
            f"{v.get('heads_checked')} heads)"
            for v in chaos["ledgers"]
        ),
        f"receipts verified offline: {chaos['receipts']['checked']} ({len(chaos['receipts']['bad'])} bad); "
        f"aggregates under their ledger's Merkle root: {chaos['merkle']['aggregates_checked']} "
        f"({len(chaos['merkle']['mismatched'])} mismatched)",
        f"acknowledged: {acked['upload_acks']} uploads, {acked['final_receipts']} final receipts; "
        f"lost: {len(acked['lost'])}",
        _full_disk_line(chaos["full_disk"]),
        f"final held-out loss: calm {calm['final_val_loss']:.4f}, chaos {chaos['final_val_loss']:.4f}, "
        f"ratio {verdict['loss_ratio']:.4f} (bar {LOSS_BAR})"
        if verdict["loss_ratio"]
        else "final loss: missing",
        f"wall: calm {calm['wall_s']} s, chaos {chaos['wall_s']} s; {'PASS' if verdict['ok'] else 'FAIL'}",
    ]
    return lines


def ledger_rounds(ledgers: Iterable[Path]) -> set[int]:
    """Rounds some ledger holds a signed head for: closed, whether or not their close event got out."""
    closed: set[int] = set()
    for path in ledgers:
        with Ledger.open(path, read_only=True) as ledger:
            closed.update(head.round for head in ledger.heads())
    return closed


def stalls_of(soak: Soak, in_ledger: set[int]) -> list[str]:
    """Rounds that ran past their deadline (plus the grace), and rounds never closed.

    A round whose head is in a ledger closed even when no close event was seen: a kill between the
    ledger's write and the event's print cuts only the event."""
    bar = soak.plan.deadline_s + STALL_GRACE_S
    late = [f"round {c['round']} took {c['round_s']} s" for c in soak.closes if c["round_s"] > bar]
    closed = {c["round"] for c in soak.closes} | in_ledger
    return late + [f"round {r} never closed" for r in range(soak.plan.rounds) if r not in closed]


def result_of(soak: Soak, ready: AggregatorReady, actions: list[Action]) -> dict[str, Any]:
    """What the soak did and what its checks found; `ok` when nothing failed."""
    plan, work = soak.plan, soak.work_dir
    state_dirs = {"aggregator": work / "aggregator", "standby": work / "standby"}
    ledgers = [d / "ledger.sqlite" for d in state_dirs.values() if (d / "ledger.sqlite").is_file()]
    verified = [
        ledger_verify(state_dirs[n], soak.keys[n]) for n in state_dirs if (state_dirs[n] / "ledger.sqlite").is_file()
    ]
    receipt_dirs = [work / f"peer-{i}" / "receipts" for i in range(plan.peers)]
    receipts = check_receipts(receipt_dirs, [soak.keys["aggregator"], soak.keys["standby"]])
    merkle = check_merkle([d for d in receipt_dirs if d.is_dir()], ledgers)
    acked = check_acknowledged(soak.acks, ledgers)
    by_round = {c["round"]: c for c in soak.closes}  # a round closed twice (a crash after its close) counts once
    losses = [by_round[r]["val_loss"] for r in sorted(by_round) if by_round[r]["val_loss"] is not None]
    full_disk = None
    if plan.full_disk:
        name = f"peer-{plan.peers - 1}"
        lines = (work / f"{name}.log").read_text(errors="replace").splitlines()
        full_disk = {
            "peer": name,
            "limit_bytes": plan.fsize_bytes,
            "errors": [ln for ln in lines if "receipt" in ln and ("too large" in ln.lower() or "space" in ln.lower())][
                :3
            ],
            "receipts_kept": len(list((work / name / "receipts").glob("*/round-*.receipt"))),
            "final_receipts_acked": sum(a.kind == "final" and a.peer == name for a in soak.acks),
        }
    stalls = stalls_of(soak, ledger_rounds(ledgers))
    result = {
        "plan": asdict(plan),
        "schedule": [asdict(a) for a in actions],
        "rounds_completed": len(by_round),
        "initial_val_loss": ready.val_loss,
        "final_val_loss": losses[-1] if losses else None,
        "counts": {
            k: soak.counts.get(k, 0)
            for k in ("peer_kills", "peer_restarts", "aggregator_kills", "aggregator_restarts")
        },
        "takeover_round": next((o["round"] for o in soak.outages if o["kind"] == "takeover"), None),
        "outages": soak.outages,
        "rounds": [by_round[r] for r in sorted(by_round)],
        "max_round_s": max((c["round_s"] for c in soak.closes), default=None),
        "stalls": stalls,
        "crashes": soak.crashes,
        "after_end": soak.after_end,
        "lingered": soak.lingered,
        "ledgers": verified,
        "receipts": receipts,
        "merkle": merkle,
        "acknowledged": acked,
        "full_disk": full_disk,
        "events": soak.log,
        "wall_s": round(soak.now(), 1),
        "process_groups": sorted({c.process.pid for c in soak.children}),  # each child's: it and its p2pd
    }
    result["ok"] = bool(
        verified
        and all(v["ok"] and v["exit"] == 0 for v in verified)
        and not receipts["bad"]
        and not merkle["mismatched"]
        and not acked["lost"]
        and not stalls
        and not soak.crashes
    )
    return result


def _full_disk_line(full: dict[str, Any] | None) -> str:
    if full is None:
        return "full disk: none"
    said = full["errors"][0].split(": ", 1)[-1] if full["errors"] else "NO ERROR LOGGED"
    return (
        f"full disk: {full['peer']} kept {full['receipts_kept']} receipts of {full['final_receipts_acked']} "
        f"verified; it said: {said}"
    )
