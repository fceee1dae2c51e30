"""What crosses the wire: keys, configs, signed messages and codecs. Imports nothing else of potluck but its errors."""

# The wire protocol's version: bumped whenever an encoding or a message's fields change, so that
# nodes running different versions refuse each other with a clear message instead of misreading bytes.
# 2: aggregates commit to their updates and the ledger; receipts carry proofs; 3: densities;
# 4: an ERROR frame carries a RefusalCode byte before its text
PROTOCOL_VERSION = 4

# How a message tells a user to move to another protocol version. It names no install command: potluck is
# installed from a clone of its repository, and a package of its name on a registry is not the project's.
UPGRADE_HINT = "upgrade potluck from where you installed it"
