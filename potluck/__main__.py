"""`python -m potluck ...`: the same as the `potluck` command (what `potluck swarm` starts its children with)."""

from potluck.cli.app import main

main()
