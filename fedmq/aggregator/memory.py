"""Returning freed heap memory to the OS (glibc), so RSS follows the live model size.

Each update passes through model-sized buffers (reassembly, decompression, decoding)
allocated on different threads.  glibc keeps what those threads free in per-thread
arenas and, once a large block has been freed, serves later large blocks from the heap
instead of fresh mappings; over hundreds of updates the retained, fragmented memory
grows although Python's live memory stays flat.  ``malloc_trim(0)`` gives the free
pages of every arena back.  Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def trim_heap() -> bool:
    """Release free heap pages to the OS; False where the C library cannot."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
