"""Keep glibc from holding on to memory a process freed (issue 14 item 10).

Embedding batches allocate and free large tensors (activations of 64 texts x 256 tokens) from
several threads. glibc serves them from per-thread arenas and, once a large block has been freed,
raises its mmap threshold dynamically, so later large blocks come from the heap, fragment it and
are never returned: memory_weaver's RSS grew by ~300 MiB over 125 embedded chunks and stayed there
(``bench/memory_rss.py``; ``malloc_trim`` got two thirds of it back, so it was free memory glibc
kept). A fixed mmap threshold (blocks above it are mapped and unmapped, never kept) and two arenas
bound that: the same run grew by ~110 MiB.

``bound_heap`` sets both with ``mallopt``; call it at process start, before large allocations.
It does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc <malloc.h>


def bound_heap(mmap_threshold: int, arena_max: int) -> bool:
    """Set glibc's mmap threshold (bytes; 0 leaves it dynamic) and arena count; True if applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    if mmap_threshold > 0:
        ok &= bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
    if arena_max > 0:
        ok &= bool(mallopt(M_ARENA_MAX, int(arena_max)))
    if not ok:
        log.warning("mallopt refused mmap_threshold=%s arena_max=%s", mmap_threshold, arena_max)
    return ok


__all__ = ["bound_heap"]
