"""Network attackers for the red team and the attack suite: each floods one of a node's doors the way someone who
has read the code would, so tests and `potluck redteam` can check the honest swarm holds while it runs.

RED TEAM ONLY: no node imports this package.
"""
