"""An adversarial peer: trains like an honest one, then sends what a red-team strategy makes of its work.

RED TEAM ONLY (`python -m potluck.lab.redteam peer --attack NAME ...`, started by `potluck redteam`).
It reports every upload it makes as an `adversarial` event with the upload's digest, so the harness
can tell, from the aggregator's own events, which adversarial updates got through.
"""

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from potluck.errors import PotluckError
from potluck.events import Adversarial, Event, encode_event
from potluck.lab.redteam.attacks import ATTACKS, AttackContext, digest_hex
from potluck.peer.runner import PeerOptions, PeerRunner
from potluck.peer.trainer import LocalTrainer, RoundWork
from potluck.protocol.config import RunConfig
from potluck.protocol.envelope import SignedUpdate
from potluck.protocol.identity import Identity, load_or_create_identity
from potluck.tasks import run_task
from potluck.training.device import set_cpu_threads


class AdversarialPeer(PeerRunner):
    """A PeerRunner whose uploads come from an attack strategy."""

    def __init__(
        self,
        identity: Identity,
        options: PeerOptions,
        *,
        attack: str,
        shared: Path,
        spool: Path | None,
        colluders: int,
        strength: float,
        on_event: Callable[[Event], None],
    ) -> None:
        super().__init__(identity, options, on_event=on_event)
        self.attack = ATTACKS[attack]
        self.attack_name = attack
        self.shared = shared
        self.spool = spool
        self.strength = strength
        self.memory: dict[str, Any] = {"colluders": colluders}
        self.extra: list[tuple[SignedUpdate, bytes]] = []

    def make_trainer(self, cfg: RunConfig) -> LocalTrainer:
        trainer = super().make_trainer(cfg)
        if self.attack_name == "label-flip":
            honest = trainer.batches
            # the attack, poisoned batches: every next-byte target reversed in value ('e' (101) is taught as 154)
            trainer.batches = ((x, 255 - y) for x, y in honest)
        return trainer

    def make_update(self, master: Any, work: RoundWork, trainer: LocalTrainer) -> tuple[SignedUpdate, bytes]:
        honest_update, honest_payload = super().make_update(master, work, trainer)
        spec = {name: tuple(t.shape) for name, t in master.params.items()}

        def fresh_delta() -> dict[str, torch.Tensor]:
            other = run_task(master.cfg).build_model(seed=int.from_bytes(self.identity.public_key[:4], "big"))
            return {n: master.params[n] - p.detach() for n, p in other.named_parameters()}

        ctx = AttackContext(
            identity=self.identity,
            header=honest_update.header,
            payload=honest_payload,
            decode=lambda payload: trainer.codec.decode(payload, spec),
            encode=lambda delta: trainer.codec.encode(delta),
            fresh_delta=fresh_delta,
            shared=self.shared,
            spool=self.spool,
            memory=self.memory,
            strength=self.strength,
        )
        uploads = self.attack(ctx)
        for update, _ in uploads:
            self.on_event(Adversarial(round=master.round, update=digest_hex(update)))
        self.extra = uploads[1:]
        return uploads[0]

    async def after_submit(self) -> None:
        for update, payload in self.extra:
            with contextlib.suppress(Exception):  # an adversary shrugs off refusals
                await self.link.submit(update, payload)
        self.extra = []


def main(argv: list[str] | None = None) -> None:
    """`python -m potluck.lab.redteam peer ...`: one adversarial peer, JSON events on stdout."""
    parser = argparse.ArgumentParser(prog="potluck.lab.redteam peer", description=__doc__)
    parser.add_argument("--join", required=True)
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--attack", choices=sorted(ATTACKS), required=True)
    parser.add_argument("--shared", type=Path, required=True)
    parser.add_argument("--spool", type=Path, default=None)
    parser.add_argument("--colluders", type=int, default=1)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    set_cpu_threads(args.threads)
    identity, _ = load_or_create_identity(args.identity)
    options = PeerOptions(join=(args.join,), host_maddrs=("/ip4/127.0.0.1/tcp/0",), reconnect_timeout_s=120)
    peer = AdversarialPeer(
        identity,
        options,
        attack=args.attack,
        shared=args.shared,
        spool=args.spool,
        colluders=args.colluders,
        strength=args.strength,
        on_event=lambda e: print(json.dumps(encode_event(e)), flush=True),
    )
    import typer

    from potluck.cli.process import run_until_stopped

    try:
        run_until_stopped(peer.run())
    except typer.Exit as e:  # Ctrl-C or SIGTERM, after a clean stop
        sys.exit(e.exit_code)
    except PotluckError as e:  # one line for the harness's log; anything else is a bug and keeps its traceback
        print(f"adversarial peer failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(e.exit_status)  # the swarm tells a diverged peer by its status


if __name__ == "__main__":
    main()
