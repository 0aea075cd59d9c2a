"""Give the C allocator's free pages back to the operating system after an update's transients.

An update step allocates and frees tens of MB per layer (selection, the new positions, values and optimizer
state moved to their new slots, the index plans). glibc keeps what is freed below its mmap threshold (which
rises to 32 MB as large blocks are freed) and reuses it only where later blocks fit, so a training
process's resident memory grew by each update's transients: at H = 16384 (2.7M kept weights) about 120 MB
over the live tensors. ``malloc_trim(0)`` returns every free page of every arena (a few milliseconds);
elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from sparsec import config


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the system (``SPARSEC_TRIM_MEMORY=0``: never); whether it could."""
    trim = _malloc_trim() if config.trim_memory else None
    if trim is None:
        return False
    trim(0)
    return True
