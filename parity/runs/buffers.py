"""Reusable memory for the tensors a comparison reads: reading into fresh memory costs twice the copy.

A new large NumPy array is fresh pages from the kernel, which zeroes each one on first touch before
the read overwrites it: reading a run file's tensors from the page cache ran at 2-5 GB/s into new
arrays and 8-9 GB/s into reused ones (docs/benchmarks.md). A comparison reads thousands of tensors
of a few sizes and drops each after its metrics, so it leases memory instead: inside `Buffers.lease()`
(one per tensor pair, on the thread that measures it) `empty()` hands out recycled memory, which
goes back to the free list when the lease ends. Outside a lease, `empty()` is `np.empty`.

Arrays handed out inside a lease must not outlive it. The free list is trimmed (largest first) so that
it and the memory leased out together stay within `keep` bytes: a pool never holds more than its user
has in flight at once, or `keep`.
"""
from __future__ import annotations

import bisect
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

MIN_BYTES = 1 << 20  # smaller arrays come from NumPy's own cache as cheaply
_leases = threading.local()


class Buffers:
    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[tuple[int, int, np.ndarray]] = []  # (size, id, buffer), sorted by size
        self._free_bytes = 0
        self._leased_bytes = 0
        self._lock = threading.Lock()

    @contextmanager
    def lease(self) -> Iterator[None]:
        """Arrays from `empty()` on this thread until the block ends come from, and return to, this pool."""
        taken: list[np.ndarray] = []
        outer = getattr(_leases, "current", None)
        _leases.current = (self, taken)
        try:
            yield
        finally:
            _leases.current = outer
            self._give(taken)

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            at = bisect.bisect_left(self._free, (nbytes, -1))
            if at < len(self._free) and self._free[at][0] <= 2 * nbytes:  # a close fit: little memory idle
                size, _, buffer = self._free.pop(at)
                self._free_bytes -= size
                self._leased_bytes += size
                return buffer
            self._leased_bytes += nbytes
        return np.empty(nbytes, np.uint8)

    def _give(self, buffers: list[np.ndarray]) -> None:
        with self._lock:
            for buffer in buffers:
                bisect.insort(self._free, (buffer.nbytes, id(buffer), buffer))
                self._free_bytes += buffer.nbytes
                self._leased_bytes -= buffer.nbytes
            while self._free and self._free_bytes + self._leased_bytes > self.keep:
                self._free_bytes -= self._free.pop()[0]


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array: recycled memory inside a lease (for arrays of MIN_BYTES and more)."""
    lease = getattr(_leases, "current", None)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if lease is None or nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    pool, taken = lease
    buffer = pool._take(nbytes)
    taken.append(buffer)
    return buffer[:nbytes].view(dtype).reshape(shape)
