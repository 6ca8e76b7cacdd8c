"""Live comparison: the candidate's tensors measured against the reference run as they are produced.

A full-size capture writes gigabytes per UNet call, most of which a comparison reads once and drops.
`LiveCompare` stands where a RunWriter would (a Recorder streams into it, sinks and taps included):
each tensor is handed to a worker thread that reads the reference's tensor of the same name (read
ahead in the reference's execution order), computes its metrics with the rule the comparison will
judge it by (compare.measure: the same code, so the same numbers as from files) and then drops it,
unless it is one the comparison or the report needs in full:

  * the pipeline's tensors (latents, noise predictions, images: small, and what the report draws) and
    the tensors derived ones are judged from (derived.py: the VAE decoder's output),
  * the first KEEP_DIVERGENT divergent tensors and the inputs of their blocks (for the diagnosis and
    a re-run of the block), and tensors the reference does not have (extra: diagnosed from their data),
  * the TOP_N tensors closest to failing (the report's drill-downs), kept as they enter the top N.

Those go to a small run file (`kept`), valid and complete like any other; `LiveRun` is the
candidate run seen by compare_runs: every tensor's entry and metrics, and the kept tensors' data.
Names must be the reference's (no name map): a live comparison is for candidates that capture
through sd-parity's own recorder, hooks or taps.
"""
from __future__ import annotations

import heapq
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sd_parity.errors import BadInput, RunFileError
from sd_parity.reports.html.drilldown import TOP_N
from sd_parity.runs.hdf5 import BackgroundWork, Entry, Indexed, RunWriter, Writer, check_tensor, kind_of, logical_dtype
from sd_parity.runs.naming import block_of
from sd_parity.runs.open import open_run
from .compare import _judging_dtype, _squeezed, measure
from .cross_device import device_pair, widened
from .derived import DERIVATIONS
from .oracles import Oracles, oracle_paths
from .tolerances import Tolerances, dtype_decision, judge

KEEP_DIVERGENT = 8
QUEUE_BYTES = 256 << 20  # tensors waiting for their metrics (the capture waits when it is full)
READ_AHEAD_BYTES = 256 << 20


class LiveCompare(Writer):
    """A RunWriter look-alike that measures each tensor against `reference` and keeps only what is needed.

    `path` is the small run file of kept tensors; `close()` writes it and returns the LiveRun to pass
    to compare_runs as the candidate (with the same tolerances, and oracle, as given here)."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any], reference: str | os.PathLike, *,
                 tolerances: Tolerances | None = None, oracle: str | os.PathLike | None = None,
                 compression: str | None = None, queue_bytes: int = QUEUE_BYTES):
        self.path = Path(path)
        self._ref = open_run(reference)
        paths = oracle_paths(oracle)
        self._oracle = Oracles(paths) if paths else None
        tolerances = tolerances or Tolerances()
        if device_pair(self._ref.metadata, metadata) is not None and oracle is None:
            tolerances = widened(tolerances)  # as compare_runs judges a cross-device pair
        self._tolerances = tolerances
        self._kept = RunWriter(path, {**metadata, "live": True}, compression=compression)
        self.before_close = self._kept.before_close
        self._entries: list[Entry] = []
        self._measured: dict[str, tuple] = {}
        self._bytes = 0
        self._divergent = 0
        # (component, block) -> (invocation, {key: array}): the inputs of each block's latest call
        self._inputs: dict[tuple[str, str], tuple[str, dict[str, np.ndarray]]] = {}
        self._kept_keys: set[str] = set()
        self._written: set[str] = set()
        self.result: LiveRun | None = None  # set by close()
        self._closest: list[tuple[float, int, str]] = []  # min-heap of (ratio, order, key): the TOP_N closest
        self._ahead = _ReadAhead(self._ref)
        self._worker = BackgroundWork(self._measure, queue_bytes)

    @property
    def tensors_written(self) -> int:
        return len(self._entries)

    @property
    def bytes_written(self) -> int:
        """Bytes of tensor data stored in the kept run file."""
        return self._kept.bytes_written

    @property
    def tensor_bytes(self) -> int:
        """Bytes of every tensor the candidate produced (what a full run file would hold)."""
        return self._bytes

    def update_metadata(self, **fields: Any) -> None:
        self._kept.update_metadata(**fields)

    def write(self, component: str, invocation: str, name: str, array: np.ndarray, layout: str | None = None) -> None:
        check_tensor(component, invocation, name, layout)
        key = f"{component}/{invocation}/{name}"
        if key in self._written:
            raise RunFileError(f"tensor {key} written twice")
        self._written.add(key)
        array = np.ascontiguousarray(array)
        entry = Entry(component, invocation, name, len(self._entries), logical_dtype(array), tuple(array.shape),
                      kind_of(component, name), layout)
        self._entries.append(entry)
        self._bytes += array.nbytes
        self._worker.put((entry, array.copy()), array.nbytes)  # a copy: producers may reuse their buffers

    def _measure(self, entry: Entry, array: np.ndarray) -> None:
        key = entry.key
        keep = entry.kind == "pipeline" or key in _derivation_sources(entry.invocation)
        if key not in self._ref:
            keep = keep or self._divergent < KEEP_DIVERGENT  # an extra tensor: diagnosed from its data
        else:
            ref_entry = self._ref.entry(key)
            judge_dtype = _judging_dtype(ref_entry.dtype, entry.dtype)
            rule = self._tolerances.rule_for(entry.component, entry.invocation, entry.name, judge_dtype)
            if entry.kind == "input":
                self._note_input(entry, array)
            if _squeezed(ref_entry.shape) != _squeezed(entry.shape):
                keep = keep or self._diverged(entry)
            elif not rule.skip:
                ref_array = self._ahead.read(ref_entry)
                metrics, ref_err, cand_err, notes, _ = measure(ref_array, array.reshape(ref_array.shape),
                                                               self._oracle, ref_entry, rule, judge_dtype)
                del ref_array
                self._measured[key] = (rule.rtol, rule.atol, metrics, ref_err, cand_err, notes)
                decision = dtype_decision(judge(metrics, rule, ref_vs_oracle=ref_err, cand_vs_oracle=cand_err),
                                          rule, ref_entry.dtype, entry.dtype)
                if not decision.passed:
                    keep = self._diverged(entry) or keep
                keep = self._closer(decision.ratio, entry) or keep
        if keep:
            self._keep(entry, array)

    def _diverged(self, entry: Entry) -> bool:
        """Whether to keep a divergent tensor (and the inputs of its block's call, which are written now)."""
        self._divergent += 1
        if self._divergent > KEEP_DIVERGENT:
            return False
        block = _block(entry)
        if block is not None and block in self._inputs and self._inputs[block][0] == entry.invocation:
            for key, (input_entry, array) in self._inputs.pop(block)[1].items():
                self._keep(input_entry, array)
        return True

    def _closer(self, ratio: float, entry: Entry) -> bool:
        """Whether the tensor is among the TOP_N closest to failing so far (the report drills into those)."""
        if ratio != ratio:  # NaN: no ordering
            return False
        item = (ratio, -entry.order, entry.key)
        if len(self._closest) < TOP_N:
            heapq.heappush(self._closest, item)
            return True
        if item > self._closest[0]:
            heapq.heapreplace(self._closest, item)
            return True
        return False

    def _note_input(self, entry: Entry, array: np.ndarray) -> None:
        """Hold the inputs of each block's latest call, until the divergences to keep are all found."""
        block = _block(entry)
        if self._divergent >= KEEP_DIVERGENT or block is None:
            self._inputs.clear()
            return
        invocation, inputs = self._inputs.get(block, (None, {}))
        if invocation != entry.invocation:
            inputs = {}
        inputs[entry.key] = (entry, array)
        self._inputs[block] = (entry.invocation, inputs)

    def _keep(self, entry: Entry, array: np.ndarray) -> None:
        if entry.key not in self._kept_keys:
            self._kept_keys.add(entry.key)
            self._kept.write(entry.component, entry.invocation, entry.name, array, entry.layout)

    def close(self) -> "LiveRun":
        try:
            self._worker.finish()
        except BaseException:
            self.abort()
            raise
        self._ahead.close()
        path = self._kept.close()
        self._ref.close()
        if self._oracle is not None:
            self._oracle.close()
        self.result = LiveRun(path, self._entries, self._measured, self._bytes)
        return self.result

    def abort(self) -> None:
        self._worker.cancel()
        self._ahead.close()
        self._kept.abort()
        self._ref.close()
        if self._oracle is not None:
            self._oracle.close()


def _derivation_sources(invocation: str) -> set[str]:
    """The tensors derived pipeline tensors are judged from (judging/derived.py): their data is needed."""
    return {source.format(invocation=invocation) for d in DERIVATIONS.values() for source in d.sources}


def _block(entry: Entry) -> tuple[str, str] | None:
    block = block_of(entry.component, entry.name)
    return (entry.component, block.test_id) if block is not None else None


def run_live(candidate: Any, config, reference: str | os.PathLike, kept: str | os.PathLike, *,
             tolerances: Tolerances | None = None, oracle: str | os.PathLike | None = None) -> "LiveRun":
    """Run `candidate` free (candidates/runner.run_free: the reference's inputs replayed) comparing its tensors
    live against `reference`; returns the LiveRun to hand to compare_runs (with the same tolerances)."""
    from sd_parity.candidates.runner import run_free

    made: list[LiveCompare] = []

    def make_writer(path: Path, metadata: dict) -> LiveCompare:
        made.append(LiveCompare(path, metadata, reference, tolerances=tolerances, oracle=oracle,
                                compression=config.compression))
        return made[-1]

    run_free(candidate, config, Path(kept), reference=Path(reference), make_writer=make_writer)
    return made[-1].result


class LiveRun(Indexed):
    """A live-compared candidate run, as compare_runs reads it: every tensor's entry (in the candidate's
    execution order) and metrics; the data of the kept tensors only (from the kept run file)."""

    def __init__(self, path: Path, entries: list[Entry], measured: dict[str, tuple], tensor_bytes: int):
        self._kept = open_run(path)
        self.path = self._kept.path
        self.metadata = self._kept.metadata
        self.tensor_bytes = tensor_bytes
        self._entries = entries
        self._by_key = {e.key: e for e in entries}
        self._measured = measured

    def holds(self, key: str) -> bool:
        """Whether the tensor's data was kept."""
        return key in self._kept

    def read(self, key: str | Entry, restore_layout: bool = False) -> np.ndarray:
        key = key.key if isinstance(key, Entry) else key
        if key not in self._kept:
            raise KeyError(f"{key} was compared live and not kept")
        return self._kept.read(key, restore_layout)

    def measured(self, key: str, rule) -> tuple:
        """(metrics, reference vs oracle, candidate vs oracle, notes) measured live under `rule`."""
        rtol, atol, *measured = self._measured[key]
        if (rtol, atol) != (rule.rtol, rule.atol):
            raise BadInput(f"{key} was measured live with rtol={rtol}, atol={atol}, and is now judged with "
                           f"rtol={rule.rtol}, atol={rule.atol}: compare with the tolerances the live run was given")
        return tuple(measured)

    def components(self) -> list[str]:
        return sorted({e.component for e in self._entries})

    def close(self) -> None:
        self._kept.close()


class _ReadAhead:
    """Reference tensors read on a thread ahead of need, in the reference's execution order."""

    def __init__(self, reader, budget: int = READ_AHEAD_BYTES):
        self._reader = reader
        self._entries = reader.entries()
        self._position = {e.key: i for i, e in enumerate(self._entries)}
        self._next = 0
        self._queue: deque[tuple[Entry, Future]] = deque()
        self._bytes = 0
        self._budget = budget
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="parity-read-ahead")
        self._lock = threading.Lock()

    def read(self, entry: Entry) -> np.ndarray:
        position = self._position[entry.key]
        while self._queue and self._position[self._queue[0][0].key] < position:  # tensors the candidate skipped
            self._bytes -= self._queue.popleft()[0].nbytes
        if self._queue and self._queue[0][0].key == entry.key:
            queued, future = self._queue.popleft()
            self._bytes -= queued.nbytes
            array = future.result()
        else:  # out of order: read it now, and read ahead from here
            for _, future in self._queue:
                future.cancel()
            self._queue.clear()
            self._bytes = 0
            self._next = position + 1
            array = self._reader.read(entry)
        self._fill()
        return array

    def _fill(self) -> None:
        while self._next < len(self._entries):
            entry = self._entries[self._next]
            if entry.kind == "pipeline" or (self._queue and self._bytes + entry.nbytes > self._budget):
                if entry.kind != "pipeline":
                    return
                self._next += 1  # pipeline tensors are few and small: read when asked
                continue
            self._queue.append((entry, self._executor.submit(self._reader.read, entry)))
            self._bytes += entry.nbytes
            self._next += 1

    def close(self) -> None:
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True)
