"""RED TEAM ONLY: misbehaving peers and the harness that measures how the aggregator copes (`potluck redteam`).

Nothing outside this package imports it; a volunteer's peer never runs any of it.
"""
