"""A node's resident memory follows what its tensors hold: glibc returns freed tensor memory at once.

PyTorch's CPU tensors come from malloc. Left to its defaults, glibc raises its mmap threshold (up to 32 MiB)
and its trim threshold (to twice that) after the first large block is freed, so a training step's freed
activations then stay in the heap. On a 10M-parameter model that put a CPU peer's peak 20-28% over its
tensors' peak (bench/memory_estimate.py): memory a volunteer's machine cannot use, and a figure
`potluck plan --memory` could not predict. A fixed mmap threshold stops the raising: every block above it
is mapped on its own and unmapped when freed, and smaller ones stay in the heap as usual.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "return_freed_memory"]

logger = logging.getLogger(__name__)

# Blocks of at least this size are mapped and unmapped on their own: a tensor of 256k floats and up. Small
# enough that activations and optimizer state go back when freed, large enough that the many small tensors of
# a step do not each cost a system call.
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process, so freed tensors go back to the system; False where not glibc.

    Called once by a node at start-up, before its model is built (blocks already in the heap stay there).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or getattr(libc, "gnu_get_libc_version", None) is None:  # musl has no such knob
        return False
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        logger.debug("glibc refused mallopt(M_MMAP_THRESHOLD, %d)", MMAP_THRESHOLD_BYTES)
        return False
    return True
