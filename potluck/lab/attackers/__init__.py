"""RED TEAM ONLY: attackers that hit a run from outside it, with no key of the run (`potluck redteam`, tests).

They attack a node's resources and what it believes rather than the model: floods of uploads, streams and
connections, and records on the DHT. Nothing outside the lab imports this package; a volunteer's peer and an
operator's aggregator never run any of it. Where it fits, an attacker is handed the coroutine that sends one
message, so a test drives it through an aggregator's handlers in process and `potluck redteam` over libp2p.
"""
