"""A peer whose reply was lost sends the same signed update again; the aggregator must answer it the same way.

A second copy of an accepted update is credited once (see test_durability); a second copy of a refused one
gets the same refusal and is not a second strike, so a flaky link cannot get an honest key banned.
"""

import asyncio
import dataclasses
from pathlib import Path

from potluck.protocol.envelope import new_nonce, sign_update
from potluck.protocol.identity import generate_identity
from tests.aggregator_server.in_process import make_server, state, submit
from tests.integration.swarm_helpers import signed_test_update


def test_a_refused_update_sent_again_gets_the_same_answer_and_no_second_strike(tmp_path: Path) -> None:
    async def scenario() -> None:
        # Prepare: an update in the wrong codec, signed by its peer (a strike: ban_after_rejections = 3)
        server = make_server(tmp_path)
        peer = generate_identity()
        server.keeper.members.add(peer.public_key)  # an update of its was accepted before: it can be struck
        good, payload = signed_test_update(*await state(server), sender=peer, tokens=2048)
        wrong = sign_update(dataclasses.replace(good.header, codec="int8", nonce=new_nonce()), peer)
        # Execute: the same update five times, as retries after lost replies would send it
        answers = [(await submit(server, wrong, payload)).receipt for _ in range(5)]
        # Assert
        assert {(a.accepted, a.reason) for a in answers} == {(False, answers[0].reason)}
        assert answers[0].reason.startswith("codec:")
        assert server.reputation.strikes[peer.public_key] == [0] and not server.reputation.is_banned(peer.public_key)
        assert server.current.rejected == 1
        assert (await submit(server, good, payload)).receipt.accepted  # the key is in good standing
        server.ledger.close()

    asyncio.run(scenario())


def test_a_copy_with_a_forged_signature_is_judged_on_its_own(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = make_server(tmp_path)
        peer, forger = generate_identity(), generate_identity()
        good, payload = signed_test_update(*await state(server), sender=peer, tokens=2048)
        wrong = sign_update(dataclasses.replace(good.header, codec="int8", nonce=new_nonce()), peer)
        assert not (await submit(server, wrong, payload)).receipt.accepted
        forged = dataclasses.replace(wrong, signature=forger.sign(wrong.header.signed_bytes()))

        answer = (await submit(server, forged, payload)).receipt

        assert answer.reason.startswith("signature:")
        assert server.current.rejected == 2
        server.ledger.close()

    asyncio.run(scenario())
