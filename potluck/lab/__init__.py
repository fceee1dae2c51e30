"""One-machine tooling: the swarm launcher behind `potluck swarm`, its fork server, the network lab of
shaped links, CPU priorities, and the red team.

Shipped with the package, since `potluck swarm` is the main command, but no node imports it: a volunteer's
peer and an operator's aggregator run the same code whether or not a lab started them.
"""
