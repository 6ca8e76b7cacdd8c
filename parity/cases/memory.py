"""Handing memory back between the phases of a case.

A case produces several large runs one after the other in one process (the reference, its fp64
oracles, the candidate free and isolated). What a phase frees stays in this process unless it is handed
back: objects in reference cycles (models, their scopes and hooks) wait for the cycle collector, which
runs by object count, not by bytes; and freed heap memory stays with the C allocator (glibc keeps it in
its arenas). Peak memory would then add up across phases instead of being the largest phase's.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from functools import lru_cache

# Below this resident size there is little to hand back, and a full collection (~0.5 s with a big
# import graph) would cost more than it saves: tiny models skip it.
WORTH_RELEASING = 1 << 30


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_memory() -> None:
    """Collect unreachable cycles, then return the C heap's free memory to the operating system."""
    resident = _resident_bytes()
    if resident is not None and resident < WORTH_RELEASING:
        return
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
