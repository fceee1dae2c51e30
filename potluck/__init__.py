"""potluck: volunteers train one model together over ordinary internet links.

Peers train locally (DiLoCo: inner AdamW, outer Nesterov), publish compressed signed
pseudo-gradients, and aggregators combine them. See DESIGN.md for the architecture.
"""

__version__ = "0.1.0"
