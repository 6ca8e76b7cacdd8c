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
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only


def release_memory() -> None:
    """Collect unreachable cycles, then return the C heap's free memory to the operating system."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
