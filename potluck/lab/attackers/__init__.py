"""RED TEAM ONLY: attacks one layer below updates (streams, records, requests), run against live local nodes.

Each attacker is a process of its own (`python -m potluck.lab.attackers.<name>`) that prints JSON events,
so tests and `potluck redteam` can start it beside an honest swarm and measure what it costs the swarm.
Nothing outside the lab imports it; a volunteer's peer never runs any of it.
"""
