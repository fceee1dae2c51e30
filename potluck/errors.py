"""The one base of potluck's one-line errors: what a user can fix, said in one line, never a traceback.

Every error the library raises for a cause outside the code (a bad flag, config, key file, payload,
peer, ledger, ...) subclasses PotluckError; the CLI catches this one type, prints its message and
exits with its exit_status (2 unless a subclass says otherwise). Any other exception is a bug and
keeps its traceback. This module imports nothing of potluck, so every component may import it.
"""

EXIT_STATUS = 2  # what the CLI exits with after printing a PotluckError's line
ERROR_PREFIX = "potluck: error: "  # how that line starts (a swarm strips it from a child's log)
# A peer whose local training went non-finite exits with this instead: a swarm (and the red team, whose
# undefended runs may be blown up on purpose) tells it from any other failure by the status alone.
DIVERGED_EXIT_STATUS = 3


class PotluckError(Exception):
    """A failure the user can act on; its message is one line that says what and, where it can, the fix."""

    exit_status: int = EXIT_STATUS  # what the CLI exits with after printing the line
