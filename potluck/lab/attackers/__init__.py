"""RED TEAM ONLY: nodes that attack a run from outside it, with no key of the run (`potluck redteam`, tests).

Nothing outside the lab imports it; a volunteer's peer and an operator's aggregator never run any of it.
"""
