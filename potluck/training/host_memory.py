"""`peer --return-memory`: glibc hands a step's large freed tensors back to the system at once.

PyTorch's CPU tensors come from malloc. Left to its defaults, glibc raises its mmap threshold (up to 32 MiB)
and its trim threshold (to twice that) after the first large block is freed, so a training step's freed
activations then stay in the heap. On a 10M-parameter model that put a CPU peer's peak 9-28% over its
tensors' peak, from run to run (bench/memory_estimate.py): memory a volunteer's machine cannot use, and a
figure `potluck plan --memory` could not predict. A fixed mmap threshold stops the raising: every block above it
is mapped on its own and unmapped when freed, and smaller ones stay in the heap as usual. Mapping costs a
page fault per page of every such allocation, so it is a volunteer's choice, not the default: a CPU step
takes about 15% longer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "return_freed_memory"]

logger = logging.getLogger(__name__)

# Blocks of at least this size are mapped and unmapped on their own: a step's large activations, logits and
# optimizer temporaries. On a 10M model on a CPU: at 1-2 MiB steps took 15-50% longer for a peak ~20% lower,
# at 4 MiB 12-16% longer for a peak ~10% lower (bench/memory_estimate.py, docs/experiments/host-memory.md).
MMAP_THRESHOLD_BYTES = 4 << 20
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
