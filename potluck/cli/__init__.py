"""The command line: `potluck` (potluck.cli.app) and its command families, one module each.

Nothing is imported here, so a command module (or the lab, which renders a peer's flags) can be imported
without the whole app.
"""
