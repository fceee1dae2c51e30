"""potluck: volunteers train one model together over ordinary internet links.

Peers train locally (DiLoCo: inner AdamW, outer Nesterov), publish compressed signed
pseudo-gradients, and aggregators combine them. See DESIGN.md for the architecture.
"""

__version__ = "0.1.0"

# The wire protocol's version: bumped whenever an encoding or a message's fields change, so that
# nodes running different versions refuse each other with a clear message instead of misreading bytes.
PROTOCOL_VERSION = 1
