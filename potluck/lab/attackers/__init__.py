"""Attacks on a node's resources rather than on the model: floods a red team sends at a live aggregator.

RED TEAM ONLY: no node imports this package. Each attacker is transport-agnostic (it is handed the
coroutine that sends one message), so a test drives it through an aggregator's handlers in process and
`potluck redteam` over libp2p.
"""
