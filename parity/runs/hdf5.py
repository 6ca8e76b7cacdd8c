"""The run file: one HDF5 file per run, the contract between an implementation and the comparer.

Layout (docs/run-format.md is the normative description):

    /                                   attrs: format, format_version, metadata (JSON), complete
    /<component>/<invocation>/<name>    one dataset per captured tensor,
                                        attrs: order (int64), dtype (logical name), kind

Writing streams: each tensor goes to disk when it is captured and is not kept. The file is written
under a temporary name and renamed only when `close()` succeeds, so a killed capture never leaves a
file that looks complete (and the `complete` attribute is set last as a second guard); the next
writer into the folder removes the temporaries of dead processes (sd_parity.outputs).

Reading trusts nothing: `RunReader` checks the whole file first (structure, attribute types, the
storage type against the dtype attribute, unique execution order, the index against the datasets,
no external storage, virtual datasets or links out of the file, the limits of runs/limits.py) and
refuses it with a RunFileError naming the problems; `validate` lists them all.
"""
from __future__ import annotations

import copy
import errno
import faulthandler
import json
import os
import pickle
import queue
import re
import select
import shutil
import signal
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import ml_dtypes
import numpy as np

from sd_parity.impl.families import COMPONENTS as MODULE_COMPONENTS
from sd_parity.errors import OutputError, RunFileError
from sd_parity.interrupts import default_handlers
from sd_parity.outputs import check_output_file, output_error, release_temporary, sweep_stale_temps, temp_path
from . import buffers
from .limits import Limits, expansion_problem, name_problem, nbytes_of, parse_metadata, json_document, shape_problem

FORMAT = "sd-parity-run"
INDEX = "index"  # optional root dataset: the tensor list as JSON, so readers need not visit every dataset
CHUNK_BYTES = 16 << 20  # as fast to read as contiguous storage, and small enough to compress
FORMAT_VERSION = 1
COMPONENTS = ("pipeline", *MODULE_COMPONENTS)  # every family's networks (sd_parity.impl.families)
INVOCATION_RE = re.compile(r"^(main|call_\d+|step_\d{3,})$")
KINDS = ("output", "input", "pipeline")
# bfloat16 has no HDF5 type: it is stored as its raw uint16 bits and tagged by the dtype attribute.
_STORED_AS = {"bfloat16": np.dtype(np.uint16)}
LOGICAL_DTYPES = {
    "float64", "float32", "float16", "bfloat16",
    "int64", "int32", "int16", "int8", "uint8", "bool",
}
# HDF5 filters a run file may use: gzip, shuffle, fletcher32, n-bit, scale-offset (built in) and lzf (h5py's)
FILTERS = {h5py.h5z.FILTER_DEFLATE: "gzip", h5py.h5z.FILTER_SHUFFLE: "shuffle", h5py.h5z.FILTER_FLETCHER32: "fletcher32",
           h5py.h5z.FILTER_NBIT: "nbit", h5py.h5z.FILTER_SCALEOFFSET: "scaleoffset", h5py.h5z.FILTER_LZF: "lzf"}
# Free space a write keeps in hand for HDF5's metadata, which it flushes later, when it sees fit: HDF5 cannot
# recover from a failed write (its objects are left half-closed), so the writer stops before the disk is full.
SPACE_RESERVE = 4 << 20
SPACE_PER_TENSOR = 2048


def storage_dtype(logical: str) -> np.dtype:
    """The NumPy dtype a tensor of logical dtype `logical` is stored and read as."""
    return _STORED_AS.get(logical, np.dtype(logical))


def step_label(step: int) -> str:
    return f"step_{step:03d}"


def call_label(index: int) -> str:
    return f"call_{index}"


def logical_dtype(array: np.ndarray) -> str:
    if array.dtype == ml_dtypes.bfloat16:
        return "bfloat16"
    name = np.dtype(array.dtype).name
    if name not in LOGICAL_DTYPES:
        raise RunFileError(f"dtype {name} cannot be stored in a run file; use one of {sorted(LOGICAL_DTYPES)}")
    return name


def kind_of(component: str, name: str) -> str:
    if component == "pipeline":
        return "pipeline"
    return "input" if "@" in name else "output"


@dataclass(frozen=True)
class Entry:
    """One stored tensor, as the index of a run file lists it."""

    component: str
    invocation: str
    name: str
    order: int
    dtype: str
    shape: tuple[int, ...]
    kind: str
    layout: str | None = None

    @property
    def key(self) -> str:
        return f"{self.component}/{self.invocation}/{self.name}"

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, storage_dtype(self.dtype).itemsize)

    def row(self) -> list:
        """The entry as a row of the index dataset."""
        return [self.component, self.invocation, self.name, self.order, self.dtype, list(self.shape), self.kind,
                self.layout]


class Writer:
    """What every run writer is as a context manager: closed (made complete) on success, aborted (nothing
    left behind) on an exception."""

    def close(self):
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RunWriter(Writer):
    """Streams tensors into a new run file; use as a context manager so failures leave no file behind.

    With `background_bytes` > 0, tensors are copied into a FIFO queue of at most that many bytes and
    written by a worker thread, so disk I/O overlaps the model's compute (which releases the GIL);
    the queue bound caps the extra memory, and FIFO order keeps execution order.
    `before_close` callbacks run when the capture is over and may still refuse it (by raising).
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any], compression: str | None = None,
                 background_bytes: int = 0):
        self.path = Path(path)
        if compression not in (None, "gzip", "lzf"):
            raise RunFileError(f"unknown compression {compression!r}; use gzip, lzf or none")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"output folder {parent} does not exist; create it or choose another --output")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"output folder {parent} is not writable; choose another --output")
        check_output_file(self.path, "--output")
        sweep_stale_temps(parent)
        self._tmp = temp_path(self.path)
        self._compression = compression
        self._index: list[list] = []
        self._order = 0
        self._bytes = 0
        self.before_close: list[Callable[[], None]] = []
        self._worker: BackgroundWork | None = None
        _WriteFailures.watch()
        self._watching = True
        try:
            # no chunk cache: a chunk is written when its dataset is created, so a failed write raises there
            # track_order: groups list their members in creation (execution) order, in h5ls and h5py alike
            self._file = h5py.File(self._tmp, "w", libver="latest", rdcc_nbytes=0, track_order=True)
            self._file.attrs["format"] = FORMAT
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._file.attrs["metadata"] = json.dumps(metadata, sort_keys=True, default=str)
        except (OSError, RuntimeError) as exc:
            self._discard()
            raise OutputError(f"cannot create {self.path}: {_cause(exc)}; choose another --output") from exc
        if background_bytes > 0:
            self._worker = BackgroundWork(self._store, background_bytes)

    @property
    def tensors_written(self) -> int:
        return self._order

    @property
    def bytes_written(self) -> int:
        return self._bytes

    def update_metadata(self, **fields: Any) -> None:
        merged = json.loads(self._file.attrs["metadata"])
        merged.update(fields)
        self._file.attrs["metadata"] = json.dumps(merged, sort_keys=True, default=str)

    def write(self, component: str, invocation: str, name: str, array: np.ndarray, layout: str | None = None) -> None:
        """Store one tensor. `layout="channels_last"` notes that the producer held a 4-D tensor with its
        channels innermost in memory: values are stored NCHW all the same, but a re-run that wants the
        producer's exact rounding must restore that layout (convolution kernels choose by it)."""
        check_tensor(component, invocation, name, layout)
        array = np.ascontiguousarray(array)
        dtype = logical_dtype(array)
        stored = array.view(_STORED_AS[dtype]) if dtype in _STORED_AS else array
        order = self._order
        self._order += 1
        self._bytes += stored.nbytes
        if self._worker is not None:
            self._worker.put((component, invocation, name, stored.copy(), dtype, order, layout), stored.nbytes)
        else:
            self._store(component, invocation, name, stored, dtype, order, layout)

    def _store(self, component: str, invocation: str, name: str, stored: np.ndarray, dtype: str, order: int,
               layout: str | None) -> None:
        key = f"{component}/{invocation}/{name}"
        self._ensure_space(stored.nbytes, key)
        group = self._group(self._group(self._file, component), invocation)
        if name in group:
            raise RunFileError(f"tensor {key} written twice")
        options: dict[str, Any] = {}
        if stored.ndim and stored.size:
            options["chunks"] = chunk_shape(stored.shape, stored.itemsize)
            if self._compression:
                options["compression"] = self._compression
        try:
            dataset = group.create_dataset(name, data=stored, **options)
            dataset.attrs["order"] = np.int64(order)
            dataset.attrs["dtype"] = dtype
            dataset.attrs["kind"] = kind_of(component, name)
            if layout:
                dataset.attrs["layout"] = layout
            del dataset
        except (OSError, RuntimeError) as exc:
            raise self._failure(exc, f"writing {key} to") from exc
        _WriteFailures.raise_any(self)
        self._index.append([component, invocation, name, order, dtype, list(stored.shape),
                            kind_of(component, name), layout])

    @staticmethod
    def _group(parent: h5py.Group, name: str) -> h5py.Group:
        """parent[name], created to track its members' creation order if it is new."""
        group = parent.get(name)
        return group if group is not None else parent.create_group(name, track_order=True)

    def _ensure_space(self, nbytes: int, what: str) -> None:
        """Stop before the disk is full (see SPACE_RESERVE): HDF5 does not survive a failed write."""
        try:
            free = shutil.disk_usage(self._tmp.parent).free
        except OSError:
            return
        needed = nbytes + SPACE_RESERVE + SPACE_PER_TENSOR * (len(self._index) + 1)
        if free < needed:
            raise OutputError(f"the disk holding {self.path} is full: {free} bytes free, about {needed} needed to "
                              f"write {what}; free some space or choose another --output")

    def _failure(self, exc: BaseException, doing: str) -> OutputError:
        _WriteFailures.failed = True
        return OutputError(f"{doing} {self.path} failed: {_cause(exc)}; free some space or choose another --output")

    def close(self) -> Path:
        """Mark the file complete and move it into place; only now does `path` exist."""
        try:
            if self._worker is not None:
                self._worker.finish()
            for check in self.before_close:
                check()
            index = json.dumps(self._index)
            self._ensure_space(len(index), "the index")
        except BaseException:
            self._discard()
            raise
        try:
            self._file.create_dataset(INDEX, data=index)
            self._file.attrs["complete"] = np.int8(1)
            self._file.close()
            _WriteFailures.raise_any(self)
        except (OSError, RuntimeError) as exc:
            self._discard()
            raise self._failure(exc, "finishing") from exc
        except BaseException:
            self._discard()
            raise
        try:
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._discard()
            raise output_error(exc, self.path) from exc
        release_temporary(self._tmp)
        self._release()
        return self.path

    def abort(self) -> None:
        self._discard()

    def _discard(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.cancel()
        file = getattr(self, "_file", None)
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - closing a broken file must not mask the original error
                _WriteFailures.failed = True
        self._tmp.unlink(missing_ok=True)
        release_temporary(self._tmp)
        self._release()

    def _release(self) -> None:
        if getattr(self, "_watching", False):
            self._watching = False
            _WriteFailures.release()


def check_tensor(component: str, invocation: str, name: str, layout: str | None = None) -> None:
    """Refuse a tensor no run file may hold under this name (what every writer checks)."""
    if component not in COMPONENTS:
        raise RunFileError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    if not INVOCATION_RE.match(invocation):
        raise RunFileError(f"bad invocation label {invocation!r}; expected main, call_N or step_NNN")
    problem = name_problem(name, WRITE_LIMITS)
    if problem:
        raise RunFileError(f"bad tensor name {name!r}: {problem}")
    if layout not in (None, "channels_last"):
        raise RunFileError(f"unknown layout {layout!r} for {name}; only channels_last is recorded")


def _cause(exc: BaseException) -> str:
    """What an HDF5 write error means for the user (h5py raises OSError or RuntimeError, errno in the text)."""
    text = str(exc)
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "errno = 28" in text or "No space" in text:
        return "the disk is full"
    if getattr(exc, "errno", None) == errno.EROFS or "Read-only file system" in text:
        return "the file system is read-only"
    return text.splitlines()[0][:300] if text else type(exc).__name__


class _WriteFailures:
    """HDF5 reports some write errors only when it drops an object (h5py prints them as "Exception ignored"
    and carries on): while writers are open, those are collected here and re-raised by the writer.
    `failed` records that a write failed at all: HDF5's own exit handler may then crash (docs/errors.md),
    which the command line avoids by leaving through os._exit."""

    failed = False
    _open = 0
    _errors: list[BaseException] = []
    _previous_hook = None

    @classmethod
    def watch(cls) -> None:
        if cls._open == 0:
            cls._previous_hook = sys.unraisablehook
            sys.unraisablehook = cls._hook
        cls._open += 1

    @classmethod
    def release(cls) -> None:
        if cls._open == 0:
            return
        cls._open -= 1
        if cls._open == 0:
            sys.unraisablehook = cls._previous_hook or sys.__unraisablehook__

    @classmethod
    def _hook(cls, unraisable) -> None:
        if "h5py" in repr(unraisable.object) or "h5py" in (unraisable.err_msg or ""):
            cls.failed = True
            cls._errors.append(unraisable.exc_value)
        else:
            (cls._previous_hook or sys.__unraisablehook__)(unraisable)

    @classmethod
    def raise_any(cls, writer: "RunWriter") -> None:
        if cls._errors:
            error, cls._errors[:] = cls._errors[0], []
            raise writer._failure(error, "writing")


def write_failed() -> bool:
    """Whether an HDF5 write failed in this process (see _WriteFailures)."""
    return _WriteFailures.failed


WRITE_LIMITS = Limits()  # what a writer may produce: the defaults, so every reader accepts it


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of at most CHUNK_BYTES, cut along the leading axes (h5py's automatic chunks are ~1 MB and
    make reading large tensors several times slower), into near-equal parts: HDF5 stores the last chunk
    of an axis whole, so cutting 4096 rows into 1638 + 1638 + 820 would store 10% of padding."""
    chunk = list(shape)
    for axis in range(len(chunk)):
        inner = int(np.prod(chunk[axis + 1:], dtype=np.int64)) * itemsize
        if inner * chunk[axis] <= CHUNK_BYTES:
            break
        most = max(1, CHUNK_BYTES // max(inner, 1))
        chunk[axis] = -(-chunk[axis] // -(-chunk[axis] // most))  # rows per part, in ceil(rows / most) parts
        if inner * chunk[axis] <= CHUNK_BYTES:
            break
    return tuple(max(1, c) for c in chunk)


class BackgroundWork:
    """A worker thread draining a byte-bounded FIFO of pending writes; its first error stops the run."""

    THREAD_NAME = "run-file-writer"

    def __init__(self, store, max_bytes: int):
        self._store = store
        self._max_bytes = max_bytes
        self._pending = 0
        self._room = threading.Condition()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def put(self, item: tuple, size: int) -> None:
        """Queue `item` (the arguments of `store`), holding `size` bytes, once the queue has room for it."""
        with self._room:
            # A tensor larger than the whole budget waits for an empty queue rather than forever.
            self._room.wait_for(lambda: self._error is not None or self._pending == 0
                                or self._pending + size <= self._max_bytes)
            self._raise_error()
            self._pending += size
        self._queue.put((item, size))

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def cancel(self) -> None:
        if self._thread.is_alive():
            with self._room:
                self._error = self._error or RunFileError("capture cancelled")
            self._queue.put(None)
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        while (queued := self._queue.get()) is not None:
            item, size = queued
            if self._error is None:
                try:
                    self._store(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the capturing thread
                    self._error = exc
            with self._room:
                self._pending -= size
                self._room.notify_all()


class Indexed:
    """A run's tensor index, as readers present it (`_entries` in execution order, `_by_key`)."""

    _entries: list[Entry]
    _by_key: dict[str, Entry]

    def entries(self) -> list[Entry]:
        """Every tensor in execution order."""
        return list(self._entries)

    def entry(self, key: str) -> Entry:
        return self._by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunReader(Indexed):
    """Reads a complete, valid run file; tensors are loaded one at a time, on request.

    The whole file is checked when it is opened (see `examine`); a file that breaks the format or a
    limit is refused with a RunFileError naming its problems."""

    def __init__(self, path: str | os.PathLike, limits: Limits | None = None):
        self.path = Path(path)
        examined = examine(self.path, limits)
        if examined.problems:
            shown = "; ".join(examined.problems[:5])
            more = f" (and {len(examined.problems) - 5} more: parity validate lists them)" if len(examined.problems) > 5 else ""
            raise RunFileError(f"{self.path} is not a valid run file: {shown}{more}")
        self._file = _open(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            self._file.close()
            raise RunFileError(f"{self.path} cannot be read ({exc.strerror})") from exc
        self.metadata: dict[str, Any] = copy.deepcopy(examined.metadata)
        self._entries = examined.entries
        self._by_key = {e.key: e for e in self._entries}

    def read(self, key: str | Entry, restore_layout: bool = False) -> np.ndarray:
        """One tensor, NCHW; with `restore_layout`, a channels_last tensor comes back as a channels-last view."""
        entry = key if isinstance(key, Entry) else self._by_key[key]
        # h5py's low-level calls: the high-level Dataset object costs ~3x more per tensor, which is most
        # of the time for the thousands of small tensors of a capture. The buffer's dtype and shape come
        # from the checked entry, so HDF5 converts whatever the file holds into exactly that (or fails).
        try:
            dataset = h5py.h5d.open(self._file.id, entry.key.encode())
            if dataset.shape != entry.shape:
                raise RunFileError(f"{self.path}: {entry.key} changed shape since the file was opened")
            data = buffers.empty(entry.shape, storage_dtype(entry.dtype))
            extents = _extents(dataset, entry) if data.nbytes >= RAW_READ_BYTES else None
            if extents is not None:
                del dataset  # HDF5's lock is not needed for the reading itself
                self._read_raw(extents, data, entry)
            elif data.size:
                dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, data)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise RunFileError(f"{self.path}: cannot read {entry.key} ({exc}); the file is truncated or corrupt, "
                               "or was changed while it was read") from exc
        if entry.dtype == "bfloat16":
            data = data.view(ml_dtypes.bfloat16)
        if restore_layout and entry.layout == "channels_last":
            data = np.ascontiguousarray(data.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        return data

    def _read_raw(self, extents: list[tuple[int, int, int]], data: np.ndarray, entry: Entry) -> None:
        """Copy the tensor's bytes straight from the file (os.preadv releases the GIL, so other threads
        measure while this one reads; HDF5's own read holds it throughout)."""
        buffer = memoryview(data.reshape(-1).view(np.uint8))
        for file_offset, length, array_offset in extents:
            done = 0
            while done < length:
                got = os.preadv(self._fd, [buffer[array_offset + done:array_offset + length]], file_offset + done)
                if got <= 0:
                    raise OSError(f"the file ends inside {entry.key}")
                done += got

    def components(self) -> list[str]:
        return sorted({e.component for e in self._entries}, key=COMPONENTS.index)

    def invocations(self, component: str) -> list[str]:
        return sorted({e.invocation for e in self._entries if e.component == component})

    def close(self) -> None:
        self._file.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


RAW_READ_BYTES = 1 << 20  # smaller tensors are read through HDF5: finding their bytes would cost as much


def _extents(dataset, entry: Entry) -> list[tuple[int, int, int]] | None:
    """Where an unfiltered tensor's bytes lie in the file: (file offset, length, offset in the tensor) runs;
    None when HDF5 must do the reading (filters, compact storage, another byte order, unwritten chunks).

    A chunk is a contiguous run of the tensor when it has size 1 on the axes before one axis and spans
    the whole of every axis after it: the shape chunk_shape() gives, and so every chunk this writer makes.
    A chunk at the end of that axis is stored whole; only its first rows belong to the tensor."""
    plist = dataset.get_create_plist()
    if plist.get_nfilters() or dataset.dtype != storage_dtype(entry.dtype) or dataset.dtype.byteorder == ">":
        return None
    itemsize = dataset.dtype.itemsize
    shape = entry.shape
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dataset.get_offset()
        return None if offset is None else [(offset, entry.nbytes, 0)]
    if layout != h5py.h5d.CHUNKED:
        return None
    chunk = plist.get_chunk()
    cut = max((axis for axis in range(len(shape)) if chunk[axis] != shape[axis]), default=0)
    if any(chunk[axis] != 1 for axis in range(cut)):
        return None
    row_bytes = int(np.prod(shape[cut + 1:], dtype=np.int64)) * itemsize
    strides = [int(np.prod(shape[axis + 1:], dtype=np.int64)) * itemsize for axis in range(len(shape))]
    extents, covered = [], 0
    for number in range(dataset.get_num_chunks()):
        info = dataset.get_chunk_info(number)
        if info.byte_offset is None or info.filter_mask:
            return None
        rows = min(chunk[cut], shape[cut] - info.chunk_offset[cut])
        length = rows * row_bytes
        if info.size < length:
            return None
        extents.append((info.byte_offset, length, sum(o * s for o, s in zip(info.chunk_offset, strides))))
        covered += length
    return extents if covered == entry.nbytes else None


def validate(path: str | os.PathLike, limits: Limits | None = None) -> list[str]:
    """Every way `path` breaks the run-file format or a limit (empty when it is valid)."""
    return examine(Path(path), limits).problems


@dataclass
class Examination:
    problems: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)  # in execution order


_EXAMINED: dict[tuple, Examination] = {}  # (file identity, limits) -> result: run files never change in place


def examine(path: Path, limits: Limits | None = None) -> Examination:
    """Check a run file completely: what RunReader and validate both rely on."""
    limits = limits or Limits.from_env()
    try:
        info = os.stat(path)
    except OSError as exc:
        return Examination([f"{path} does not exist or cannot be read ({exc.strerror})"])
    if not stat.S_ISREG(info.st_mode):
        return Examination([f"{path} is not a regular file"])
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, limits)
    if identity in _EXAMINED:
        return _EXAMINED[identity]
    result = (_examine_in_child if _can_fork() else _examine_here)(path, limits, info.st_size)
    if len(_EXAMINED) > 64:
        _EXAMINED.clear()
    _EXAMINED[identity] = result
    return result


def _can_fork() -> bool:
    """Fork where it is cheap and safe: on Linux, and not while a run-file writer thread may hold h5py's
    lock (the child would wait on it forever)."""
    return (hasattr(os, "fork") and sys.platform.startswith("linux")
            and not any(t.name == BackgroundWork.THREAD_NAME for t in threading.enumerate()))


def _examine_here(path: Path, limits: Limits, file_bytes: int, progress: Callable[[], None] = lambda: None
                  ) -> Examination:
    try:
        file = _open(path)
    except RunFileError as exc:
        return Examination([str(exc)])
    with file:
        return _Examiner(file, limits, file_bytes, progress).run()


STALL_SECONDS = 30.0  # an examination that reports no progress for this long is stuck in HDF5


def _examine_in_child(path: Path, limits: Limits, file_bytes: int) -> Examination:
    """Examine in a forked child: HDF5 can loop forever or crash on a corrupt file (fuzzing finds both, in
    the C library, where Python cannot stop it). The child reports progress; one that crashes, or stops
    progressing for STALL_SECONDS, is killed and the file reported as corrupt."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: examine, send the result, leave without running the parent's exit handlers
        status = 1
        try:
            faulthandler.disable()  # a crash here is reported by the parent, as a corrupt file
            default_handlers()  # the parent cleans up on a signal; this helper just stops
            os.close(read_end)
            result = _examine_here(path, limits, file_bytes, lambda: os.write(write_end, b"."))
            payload = b"=" + pickle.dumps(result)
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view):]
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    received, finished, status = bytearray(), False, 0
    try:
        while not finished:
            if not select.select([read_end], [], [], STALL_SECONDS)[0]:
                return Examination([f"{path}: reading its structure made no progress for {STALL_SECONDS:.0f} s "
                                    "(the HDF5 library loops on some corrupt files); the file is corrupt"])
            chunk = os.read(read_end, 1 << 20)
            received += chunk
            finished = not chunk
    finally:
        os.close(read_end)
        if not finished:
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    start = received.find(b"=")  # progress dots come first, then the result
    if start < 0 or status:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {status}"
        return Examination([f"{path}: the HDF5 library crashed reading it ({how}); the file is corrupt"])
    return pickle.loads(bytes(received[start + 1:]))


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as exc:
        raise RunFileError(f"{path} is not a readable HDF5 file ({exc}); it may be truncated or still being "
                           "written") from exc


class _Unreadable(Exception):
    """An attribute or object h5py cannot read: a problem of the file, reported as such."""


_MISSING = object()
_NATIVE_INT64 = h5py.h5t.NATIVE_INT64
_VLEN_STR = h5py.h5t.py_create(h5py.string_dtype())
_CLASS_NAMES = {h5py.h5t.INTEGER: "an integer", h5py.h5t.FLOAT: "a float", h5py.h5t.STRING: "a string",
                h5py.h5t.ENUM: "an enum (boolean?)"}


def _open_attribute(oid, name: str, kind: int, expected: str):
    """The attribute, or None when absent; it must hold exactly one value (a larger one would overflow
    the one-value buffers the readers below hand HDF5) of the HDF5 type class `kind`."""
    try:
        attr = h5py.h5a.open(oid, name.encode())
    except KeyError:
        return None
    if attr.get_space().get_simple_extent_npoints() != 1:
        raise _Unreadable(f"attribute {name!r} has {attr.get_space().get_simple_extent_npoints()} values, not one")
    found = attr.get_type().get_class()
    if found != kind:
        raise _Unreadable(f"attribute {name!r} is {_CLASS_NAMES.get(found, 'of another type')}, expected {expected}")
    return attr


def _int_attribute(oid, name: str) -> Any:
    """An integer attribute's value, or _MISSING."""
    attr = _open_attribute(oid, name, h5py.h5t.INTEGER, "an integer")
    if attr is None:
        return _MISSING
    buffer = np.empty((), np.int64)
    attr.read(buffer, mtype=_NATIVE_INT64)
    return int(buffer)


def _text_attribute(oid, name: str) -> Any:
    """A string attribute's value (UTF-8, fixed or variable length), or _MISSING."""
    attr = _open_attribute(oid, name, h5py.h5t.STRING, "a string")
    if attr is None:
        return _MISSING
    string_type = attr.get_type()
    if string_type.is_variable_str():
        buffer = np.empty((), object)
        attr.read(buffer, mtype=_VLEN_STR)
        return _as_text(buffer[()], f"attribute {name!r}")
    # Fixed length, as C, Fortran and Rust HDF5 libraries write strings: padded with NULs or (Fortran)
    # spaces, and in their declared character set; ASCII-declared bytes above 127 are read as Latin-1.
    buffer = np.empty((), attr.dtype)
    attr.read(buffer)
    raw = bytes(buffer[()]).rstrip(b" " if string_type.get_strpad() == h5py.h5t.STR_SPACEPAD else b"\0")
    return _as_text(raw, f"attribute {name!r}", latin1=string_type.get_cset() == h5py.h5t.CSET_ASCII)


def _as_text(value: Any, what: str, latin1: bool = False) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            if latin1:
                return bytes(value).decode("latin-1")
            raise _Unreadable(f"{what} is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise _Unreadable(f"{what} is {_type_name(value)}, expected a string")


def _type_name(value: Any) -> str:
    if isinstance(value, (bytes, str, np.bytes_)):
        return "a string"
    if isinstance(value, (float, np.floating)):
        return "a float"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    return f"a {type(value).__name__}"


def _decode(name: bytes) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unreadable(f"the name {name!r} is not UTF-8") from None


class _Examiner:
    """One pass over a run file with h5py's low-level API (fast enough for tens of thousands of tensors)."""

    def __init__(self, file: h5py.File, limits: Limits, file_bytes: int, progress: Callable[[], None]):
        self.file, self.limits, self.file_bytes, self.progress = file, limits, file_bytes, progress
        self.problems: list[str] = []
        self.entries: list[Entry] = []
        self.orders: dict[int, str] = {}
        self.refused: set[str] = set()  # keys of datasets with problems (the index may list them)
        self.links = 0

    def run(self) -> Examination:
        metadata = self._root()
        index = None
        for name, oid in self._members(self.file.id, "/"):
            if name == INDEX:
                index = self._index(oid)
            elif name not in COMPONENTS or not isinstance(oid, h5py.h5g.GroupID):
                self.problems.append(f"/{name}: unknown {'component' if isinstance(oid, h5py.h5g.GroupID) else 'object'}"
                                     f" (expected one of {', '.join(COMPONENTS)} or the {INDEX} dataset)")
            else:
                self._component(name, oid)
        if index is not None:
            self._compare_index(index)
        self.entries.sort(key=lambda e: e.order)
        return Examination(self.problems, metadata if metadata is not None else {}, self.entries)

    def _root(self) -> dict[str, Any] | None:
        root = self.file.id
        checks = (("format", _text_attribute), ("format_version", _int_attribute), ("complete", _int_attribute),
                  ("metadata", _text_attribute))
        values = {}
        for name, read in checks:
            try:
                values[name] = read(root, name)
            except _Unreadable as exc:
                self.problems.append(f"root: {exc}")
            except Exception as exc:  # noqa: BLE001 - h5py cannot read what the file holds
                self.problems.append(f"root: attribute {name!r} cannot be read ({type(exc).__name__}: {exc})")
        if "format" in values and values["format"] != FORMAT:
            shown = None if values["format"] is _MISSING else values["format"]
            self.problems.append(f"root attribute format is {shown!r}, expected {FORMAT!r}")
        if "format_version" in values and values["format_version"] != FORMAT_VERSION:
            shown = None if values["format_version"] is _MISSING else values["format_version"]
            self.problems.append(f"format_version is {shown}; this reader understands {FORMAT_VERSION}")
        if values.get("complete", _MISSING) != 1:
            self.problems.append("the file is not marked complete (the capture did not finish)")
        text = values.get("metadata", _MISSING)
        if "metadata" in values and text is _MISSING:
            self.problems.append("root attribute metadata is missing or not JSON")
        if text is _MISSING:
            return None
        try:
            return parse_metadata(text, self.limits, "root attribute metadata")
        except RunFileError as exc:
            self.problems.append(str(exc))
        return None

    def _members(self, group, where: str):
        """(name, opened object) for each link of `group` that is a hard link to a group or dataset."""
        try:
            names = list(group)
        except Exception as exc:  # noqa: BLE001 - a corrupt group
            self.problems.append(f"{where}: cannot list its members ({exc})")
            return
        for raw in names:
            self.links += 1
            if self.links % 64 == 0:
                self.progress()
            if self.links > self.limits.tensors + 1000:
                if self.links == self.limits.tensors + 1001:
                    self.problems.append(f"more than {self.limits.tensors} tensors (raise SD_PARITY_MAX_TENSORS "
                                         "if the file is genuine)")
                return
            try:
                name = _decode(raw)
                path = f"{where.rstrip('/')}/{name}"
                kind = group.links.get_info(raw).type
                if kind != h5py.h5l.TYPE_HARD:
                    what = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}.get(
                        kind, "a user-defined link")
                    self.problems.append(f"{path} is {what}; a run file holds its tensors itself (links are refused)")
                    continue
                oid = h5py.h5o.open(group, raw)
            except _Unreadable as exc:
                self.problems.append(f"{where}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - corrupt object headers surface as many types
                self.problems.append(f"{where}/{raw!r}: cannot be opened ({exc})")
                continue
            yield name, oid

    def _component(self, component: str, group) -> None:
        for invocation, oid in self._members(group, f"/{component}"):
            if not INVOCATION_RE.match(invocation) or not isinstance(oid, h5py.h5g.GroupID):
                self.problems.append(f"/{component}/{invocation}: invocation must be a group named main, call_N or "
                                     "step_NNN")
                continue
            for name, dataset in self._members(oid, f"/{component}/{invocation}"):
                key = f"/{component}/{invocation}/{name}"
                if not isinstance(dataset, h5py.h5d.DatasetID):
                    self.problems.append(f"{key}: expected a dataset, found a group (names may not contain '/')")
                    continue
                try:
                    entry = self._tensor(component, invocation, name, dataset)
                except _Unreadable as exc:
                    self.problems.append(f"{key}: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001 - h5py cannot map what the file holds
                    self.problems.append(f"{key}: cannot be read ({type(exc).__name__}: {exc})")
                    continue
                if entry is not None:
                    self.entries.append(entry)

    @staticmethod
    def _storage(dataset) -> tuple[str | None, int]:
        """(why the data cannot be read from this file alone, or None; the number of filters it passes)."""
        try:
            plist = dataset.get_create_plist()
            if plist.get_layout() == h5py.h5d.VIRTUAL:
                return "is a virtual dataset (its data lives in other files); a run file holds its tensors itself", 0
            if plist.get_external_count():
                return "uses external storage (its data lives in another file); a run file holds its tensors itself", 0
            filters = plist.get_nfilters()
            for i in range(filters):
                code = plist.get_filter(i)[0]
                if code not in FILTERS or not h5py.h5z.filter_avail(code):
                    return (f"is compressed with HDF5 filter {code}, which sd-parity does not read; "
                            f"use {', '.join(sorted(set(FILTERS.values())))}"), filters
        except Exception as exc:  # noqa: BLE001
            return f"has an unreadable storage description ({exc})", 0
        return None, filters

    def _tensor(self, component: str, invocation: str, name: str, dataset) -> Entry | None:
        key = f"/{component}/{invocation}/{name}"
        before = len(self.problems)
        self.refused.add(key[1:])  # until it passes every check
        storage_problem, filters = self._storage(dataset)
        problem = name_problem(name, self.limits) or storage_problem
        if problem:
            self.problems.append(f"{key}: {problem}")
            return None
        shape = dataset.shape
        if shape is None:
            self.problems.append(f"{key}: has no dataspace (an HDF5 null dataspace); store an empty array instead")
            return None
        problem = shape_problem(shape, self.limits)
        if problem:
            self.problems.append(f"{key}: {problem}")
            return None
        values = {}
        for attr, read in (("order", _int_attribute), ("dtype", _text_attribute), ("kind", _text_attribute)):
            values[attr] = read(dataset, attr)
            if values[attr] is _MISSING:
                self.problems.append(f"{key}: missing attribute {attr!r}")
        order, dtype, kind = (None if v is _MISSING else v for v in values.values())
        if order is not None:
            if order in self.orders:
                self.problems.append(f"{key}: order {order} also used by {self.orders[order]} (the execution order "
                                     "must be unique)")
            self.orders.setdefault(order, key)
        layout = _text_attribute(dataset, "layout") if h5py.h5a.get_num_attrs(dataset) > 3 else _MISSING
        layout = None if layout is _MISSING else layout
        if dtype is not None and dtype not in LOGICAL_DTYPES:
            self.problems.append(f"{key}: dtype {dtype!r} is not one of {sorted(LOGICAL_DTYPES)}")
        elif dtype is not None:
            expected, stored = storage_dtype(dtype), dataset.dtype
            if stored.kind != expected.kind or stored.itemsize != expected.itemsize:
                self.problems.append(f"{key}: stored as {stored}, expected {expected} for {dtype}")
            else:
                unstored = self._missing_data(dataset, nbytes_of(shape, expected.itemsize), filters)
                if unstored:
                    self.problems.append(f"{key}: {unstored}")
        if kind is not None and kind != kind_of(component, name):
            self.problems.append(f"{key}: kind is {kind!r}; it must be {kind_of(component, name)!r} "
                                 "(pipeline for component pipeline, input for names with '@', else output)")
        if layout is not None and (layout != "channels_last" or len(shape) != 4):
            self.problems.append(f"{key}: layout may only be channels_last, on a 4-D tensor")
        if len(self.problems) > before:
            return None
        self.refused.discard(key[1:])
        return Entry(component, invocation, name, order, dtype, tuple(int(n) for n in shape), kind, layout)

    def _missing_data(self, dataset, nbytes: int, filters: int) -> str | None:
        """A tensor too large to load from this file, or one whose data was partly never written."""
        problem = expansion_problem(nbytes, self.file_bytes, self.limits)
        if problem:
            return problem
        stored = dataset.get_storage_size()
        if not filters and stored < nbytes:
            return (f"holds {stored} bytes of data for a {nbytes}-byte tensor: part of it was never written "
                    "(an interrupted writer?)")
        return None

    def _index(self, dataset) -> list[Entry] | None:
        if not isinstance(dataset, h5py.h5d.DatasetID):
            self.problems.append(f"/{INDEX} is not a dataset")
            return None
        problem, _ = self._storage(dataset)
        try:
            if problem:
                raise _Unreadable(problem)
            if dataset.shape != ():
                raise _Unreadable("is not a scalar string")
            if dataset.dtype.kind == "S" and dataset.dtype.itemsize > self.limits.index_bytes:
                raise _Unreadable(f"is {dataset.dtype.itemsize} bytes, more than the limit of {self.limits.index_bytes}")
            buffer = np.empty((), dtype=dataset.dtype)
            dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, buffer)
            rows = json_document(_as_text(buffer[()], f"/{INDEX}"), self.limits.index_bytes, 4, f"/{INDEX}")
        except _Unreadable as exc:
            self.problems.append(f"/{INDEX}: {exc}")
            return None
        except RunFileError as exc:
            self.problems.append(str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - h5py cannot read it
            self.problems.append(f"/{INDEX}: cannot be read ({exc})")
            return None
        entries = []
        for number, row in enumerate(rows if isinstance(rows, list) else [None]):
            entry = _index_entry(row)
            if entry is None:
                self.problems.append(f"/{INDEX}: row {number} is not [component, invocation, name, order, dtype, "
                                     f"shape, kind, layout]: {str(row)[:200]}")
                return None
            entries.append(entry)
        return entries

    def _compare_index(self, indexed: list[Entry]) -> None:
        by_key = {e.key: e for e in indexed}
        stored = {e.key: e for e in self.entries}
        problems = [f"/{INDEX} lists {key} twice" for key in _repeated(e.key for e in indexed)]
        problems += [f"/{INDEX} lists {key}, which is not stored" for key in by_key.keys() - stored.keys()
                     if key not in self.refused]
        problems += [f"/{INDEX} omits {key}" for key in stored.keys() - by_key.keys()]
        problems += [f"/{INDEX} disagrees with the dataset {key}: index {by_key[key].row()}, dataset "
                     f"{stored[key].row()}" for key in by_key.keys() & stored.keys() if by_key[key] != stored[key]]
        self.problems.extend(sorted(problems)[:20])


def _repeated(keys) -> list[str]:
    seen: set[str] = set()
    return [key for key in keys if key in seen or seen.add(key)]


def _index_entry(row: Any) -> Entry | None:
    if not isinstance(row, list) or len(row) != 8:
        return None
    component, invocation, name, order, dtype, shape, kind, layout = row
    if not (all(isinstance(v, str) for v in (component, invocation, name, dtype, kind))
            and isinstance(order, int) and not isinstance(order, bool) and isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
            and (layout is None or isinstance(layout, str))):
        return None
    return Entry(component, invocation, name, order, dtype, tuple(shape), kind, layout)
