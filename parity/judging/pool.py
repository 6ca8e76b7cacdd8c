"""Run one function over many tensors on a few threads, results in order, with a cap on bytes in flight.

Comparing two runs is reading (the kernel copying file pages, which releases the GIL) and metrics
(NumPy loops over chunks, which release it too): running several tensors at once overlaps the reading
of one with the metrics of another, and puts the metrics on more than one core. A task is submitted
only while the bytes of the tasks not yet handed back stay within `budget`, so memory stays bounded
whatever the run holds (one task larger than the budget runs alone). Results come back in the order
of the items, so whatever consumes them sees the reference's execution order.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from sd_parity import threads

Item = TypeVar("Item")
Result = TypeVar("Result")

# Bytes of tensors read but not yet measured: enough to keep every worker busy on the largest tensors
# of SD's networks (84 MB per side for the SD 1.5 UNet at 64x64), small beside the models themselves.
DEFAULT_BUDGET = 384 << 20


def default_workers() -> int:
    """The thread count of parity.threads plus one: a task spends part of its time waiting on the disk."""
    return threads.current_threads() + 1


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], cost: Callable[[Item], int], *,
                workers: int | None = None, budget: int | None = None) -> Iterator[tuple[Item, Result]]:
    """(item, function(item)) for each item, in order; at most `budget` bytes (by `cost`) in flight.

    With one worker everything runs in the calling thread, exactly as a loop would. A task's exception
    is raised when its turn comes; the tasks still queued behind it are cancelled."""
    workers = workers or default_workers()
    budget = DEFAULT_BUDGET if budget is None else budget
    if workers <= 1:
        for item in items:
            yield item, function(item)
        return
    pending: deque[tuple[Item, int, Future]] = deque()
    in_flight = 0
    executor = ThreadPoolExecutor(workers, thread_name_prefix="parity-compare")
    try:
        for item in items:
            size = cost(item)
            while pending and (in_flight + size > budget or len(pending) >= 4 * workers):
                done, done_size, future = pending.popleft()
                in_flight -= done_size
                yield done, future.result()
            pending.append((item, size, executor.submit(function, item)))
            in_flight += size
        while pending:
            done, _, future = pending.popleft()
            yield done, future.result()
    finally:
        for _, _, future in pending:
            future.cancel()
        executor.shutdown(wait=True)
