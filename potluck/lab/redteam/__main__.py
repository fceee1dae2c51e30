"""`python -m potluck.lab.redteam peer ...`: start one adversarial peer (what `potluck redteam` runs)."""

import sys

from potluck.lab.redteam.peer import main

if len(sys.argv) < 2 or sys.argv[1] != "peer":
    sys.exit("usage: python -m potluck.lab.redteam peer --join ADDR --identity KEY --attack NAME --shared DIR ...")
main(sys.argv[2:])
