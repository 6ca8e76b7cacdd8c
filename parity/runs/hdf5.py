"""The run file: one HDF5 file per run, the contract between an implementation and the comparer.

Layout (docs/run-format.md is the normative description):

    /                                   attrs: format, format_version, metadata (JSON), complete
    /<component>/<invocation>/<name>    one dataset per captured tensor,
                                        attrs: order (int64), dtype (logical name), kind

Writing streams: each tensor goes to disk when it is captured and is not kept. The file is written
under a temporary name and renamed only when `close()` succeeds, so a killed capture never leaves a
file that looks complete (and the `complete` attribute is set last as a second guard).
"""
from __future__ import annotations

import json
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import ml_dtypes
import numpy as np

from sd_parity.impl.families import COMPONENTS as MODULE_COMPONENTS

FORMAT = "sd-parity-run"
INDEX = "index"  # optional root dataset: the tensor list as JSON, so readers need not visit every dataset
CHUNK_BYTES = 16 << 20  # as fast to read as contiguous storage, and small enough to compress
FORMAT_VERSION = 1
COMPONENTS = ("pipeline", *MODULE_COMPONENTS)  # every family's networks (sd_parity.impl.families)
INVOCATION_RE = re.compile(r"^(main|call_\d+|step_\d{3,})$")
NAME_FORBIDDEN = re.compile(r"[/\x00]")
KINDS = ("output", "input", "pipeline")
# bfloat16 has no HDF5 type: it is stored as its raw uint16 bits and tagged by the dtype attribute.
_STORED_AS = {"bfloat16": np.dtype(np.uint16)}
LOGICAL_DTYPES = {
    "float64", "float32", "float16", "bfloat16",
    "int64", "int32", "int16", "int8", "uint8", "bool",
}


class RunFileError(Exception):
    """A run file is missing, unreadable, incomplete or breaks the format."""


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
        itemsize = 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize


class RunWriter:
    """Streams tensors into a new run file; use as a context manager so failures leave no file behind.

    With `background_bytes` > 0, tensors are copied into a FIFO queue of at most that many bytes and
    written by a worker thread, so disk I/O overlaps the model's compute (which releases the GIL);
    the queue bound caps the extra memory, and FIFO order keeps execution order.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any], compression: str | None = None,
                 background_bytes: int = 0):
        self.path = Path(path)
        if compression not in (None, "gzip", "lzf"):
            raise RunFileError(f"unknown compression {compression!r}; use gzip, lzf or none")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise RunFileError(f"output folder {parent} does not exist; create it or choose another --output")
        if not os.access(parent, os.W_OK):
            raise RunFileError(f"output folder {parent} is not writable; choose another --output")
        self._tmp = parent / f".{self.path.name}.tmp-{os.getpid()}"
        self._compression = compression
        self._index: list[list] = []
        self._order = 0
        self._bytes = 0
        try:
            self._file = h5py.File(self._tmp, "w", libver="latest")
            self._file.attrs["format"] = FORMAT
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._file.attrs["metadata"] = json.dumps(metadata, sort_keys=True, default=str)
        except OSError as exc:
            self._discard()
            raise RunFileError(f"cannot create {self._tmp}: {exc}") from exc
        self._worker: _BackgroundWrites | None = None
        if background_bytes > 0:
            self._worker = _BackgroundWrites(self._store, background_bytes)

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
        if component not in COMPONENTS:
            raise RunFileError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        if not INVOCATION_RE.match(invocation):
            raise RunFileError(f"bad invocation label {invocation!r}; expected main, call_N or step_NNN")
        if not name or NAME_FORBIDDEN.search(name):
            raise RunFileError(f"bad tensor name {name!r}: names are non-empty and contain no '/'")
        array = np.ascontiguousarray(array)
        dtype = logical_dtype(array)
        stored = array.view(_STORED_AS[dtype]) if dtype in _STORED_AS else array
        order = self._order
        self._order += 1
        self._bytes += stored.nbytes
        if layout not in (None, "channels_last"):
            raise RunFileError(f"unknown layout {layout!r} for {name}; only channels_last is recorded")
        if self._worker is not None:
            self._worker.put((component, invocation, name, stored.copy(), dtype, order, layout))
        else:
            self._store(component, invocation, name, stored, dtype, order, layout)

    def _store(self, component: str, invocation: str, name: str, stored: np.ndarray, dtype: str, order: int,
               layout: str | None) -> None:
        group = self._file.require_group(f"{component}/{invocation}")
        if name in group:
            raise RunFileError(f"tensor {component}/{invocation}/{name} written twice")
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
        except OSError as exc:
            raise RunFileError(f"writing {component}/{invocation}/{name} to {self._tmp} failed: {exc} "
                               "(is the disk full?)") from exc
        self._index.append([component, invocation, name, order, dtype, list(stored.shape),
                            kind_of(component, name), layout])

    def close(self) -> Path:
        """Mark the file complete and move it into place; only now does `path` exist."""
        try:
            if self._worker is not None:
                self._worker.finish()
        except BaseException:
            self._discard()
            raise
        try:
            self._file.create_dataset(INDEX, data=json.dumps(self._index))
            self._file.attrs["complete"] = np.int8(1)
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._discard()
            raise RunFileError(f"finishing {self.path} failed: {exc}") from exc
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
                pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of at most CHUNK_BYTES, cut along the leading axes (h5py's automatic chunks are ~1 MB and
    make reading large tensors several times slower)."""
    chunk = list(shape)
    for axis in range(len(chunk)):
        inner = int(np.prod(chunk[axis + 1:], dtype=np.int64)) * itemsize
        if inner * chunk[axis] <= CHUNK_BYTES:
            break
        chunk[axis] = max(1, CHUNK_BYTES // max(inner, 1))
        if inner * chunk[axis] <= CHUNK_BYTES:
            break
    return tuple(max(1, c) for c in chunk)


class _BackgroundWrites:
    """A worker thread draining a byte-bounded FIFO of pending writes; its first error stops the run."""

    def __init__(self, store, max_bytes: int):
        self._store = store
        self._max_bytes = max_bytes
        self._pending = 0
        self._room = threading.Condition()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="run-file-writer", daemon=True)
        self._thread.start()

    def put(self, item: tuple) -> None:
        size = item[3].nbytes
        with self._room:
            # A tensor larger than the whole budget waits for an empty queue rather than forever.
            self._room.wait_for(lambda: self._error is not None or self._pending == 0
                                or self._pending + size <= self._max_bytes)
            self._raise_error()
            self._pending += size
        self._queue.put(item)

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
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._store(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the capturing thread
                    self._error = exc
            with self._room:
                self._pending -= item[3].nbytes
                self._room.notify_all()


class RunReader:
    """Reads a complete run file; tensors are loaded one at a time, on request."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        problems = validate(self.path, deep=False)
        if problems:
            raise RunFileError(f"{self.path} is not a valid run file: " + "; ".join(problems[:5]))
        self._file = h5py.File(self.path, "r")
        self.metadata: dict[str, Any] = json.loads(self._file.attrs["metadata"])
        self._entries = sorted(_read_index(self._file) or _scan(self._file), key=lambda e: e.order)
        self._by_key = {e.key: e for e in self._entries}

    def entries(self) -> list[Entry]:
        """Every tensor in execution order."""
        return list(self._entries)

    def entry(self, key: str) -> Entry:
        return self._by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def read(self, key: str | Entry, restore_layout: bool = False) -> np.ndarray:
        """One tensor, NCHW; with `restore_layout`, a channels_last tensor comes back as a channels-last view."""
        entry = key if isinstance(key, Entry) else self._by_key[key]
        # h5py's low-level calls: the high-level Dataset object costs ~3x more per tensor, which is most
        # of the time for the thousands of small tensors of a capture
        dataset = h5py.h5d.open(self._file.id, entry.key.encode())
        data = np.empty(entry.shape, dtype=dataset.dtype)
        if data.size:
            dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, data)
        if entry.dtype == "bfloat16":
            data = data.view(ml_dtypes.bfloat16)
        if restore_layout and entry.layout == "channels_last":
            data = np.ascontiguousarray(data.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        return data

    def components(self) -> list[str]:
        return sorted({e.component for e in self._entries}, key=COMPONENTS.index)

    def invocations(self, component: str) -> list[str]:
        return sorted({e.invocation for e in self._entries if e.component == component})

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RunReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_index(file: h5py.File) -> list[Entry] | None:
    dataset = file.get(INDEX)
    if not isinstance(dataset, h5py.Dataset):
        return None
    return [Entry(c, i, n, int(o), d, tuple(shape), k, layout)
            for c, i, n, o, d, shape, k, layout in json.loads(dataset[()])]


def _scan(file: h5py.File) -> Iterator[Entry]:
    for component, comp_group in file.items():
        if component == INDEX or not isinstance(comp_group, h5py.Group):
            continue
        for invocation, inv_group in comp_group.items():
            if not isinstance(inv_group, h5py.Group):
                continue
            for name, dataset in inv_group.items():
                layout = dataset.attrs.get("layout")
                yield Entry(component, invocation, name, int(dataset.attrs["order"]), str(dataset.attrs["dtype"]),
                            tuple(dataset.shape), str(dataset.attrs["kind"]), None if layout is None else str(layout))


def validate(path: str | os.PathLike, deep: bool = True) -> list[str]:
    """Return every way `path` breaks the run-file format (empty when it is valid).

    `deep` also reads each dataset's attributes and checks them; the shallow check only looks at the
    root, which is what opening a file for reading needs.
    """
    path = Path(path)
    if not path.exists():
        return [f"{path} does not exist"]
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        return [f"{path} is not a readable HDF5 file ({exc}); it may be truncated or still being written"]
    problems: list[str] = []
    with file:
        attrs = file.attrs
        if attrs.get("format") != FORMAT:
            problems.append(f"root attribute format is {attrs.get('format')!r}, expected {FORMAT!r}")
        version = attrs.get("format_version")
        if version is None or int(version) != FORMAT_VERSION:
            shown = None if version is None else int(version)
            problems.append(f"format_version is {shown}; this reader understands {FORMAT_VERSION}")
        if int(attrs.get("complete", 0)) != 1:
            problems.append("the file is not marked complete (the capture did not finish)")
        try:
            metadata = json.loads(attrs.get("metadata", ""))
            if not isinstance(metadata, dict):
                problems.append("metadata is not a JSON object")
        except (TypeError, ValueError):
            problems.append("root attribute metadata is missing or not JSON")
        if deep:
            problems.extend(_validate_tensors(file))
    return problems


def _validate_index(file: h5py.File) -> list[str]:
    try:
        indexed = {e.key: e for e in _read_index(file) or []}
    except (ValueError, TypeError) as exc:
        return [f"/{INDEX}: not a JSON list of [component, invocation, name, order, dtype, shape, kind, layout] ({exc})"]
    stored = {e.key: e for e in _scan(file)}
    problems = [f"/{INDEX} lists {key}, which is not stored" for key in indexed.keys() - stored.keys()]
    problems += [f"/{INDEX} omits {key}" for key in stored.keys() - indexed.keys()]
    problems += [f"/{INDEX} disagrees with the attributes of {key}" for key in indexed.keys() & stored.keys()
                 if indexed[key] != stored[key]]
    return problems[:20]


def _validate_tensors(file: h5py.File) -> list[str]:
    problems: list[str] = []
    orders: dict[int, str] = {}
    for component, comp_group in file.items():
        if component == INDEX:
            problems.extend(_validate_index(file))
            continue
        if component not in COMPONENTS or not isinstance(comp_group, h5py.Group):
            problems.append(f"/{component}: unknown component (expected one of {COMPONENTS})")
            continue
        for invocation, inv_group in comp_group.items():
            where = f"/{component}/{invocation}"
            if not INVOCATION_RE.match(invocation) or not isinstance(inv_group, h5py.Group):
                problems.append(f"{where}: invocation must be a group named main, call_N or step_NNN")
                continue
            for name, dataset in inv_group.items():
                key = f"{where}/{name}"
                if not isinstance(dataset, h5py.Dataset):
                    problems.append(f"{key}: expected a dataset, found a group (names may not contain '/')")
                    continue
                for attr in ("order", "dtype", "kind"):
                    if attr not in dataset.attrs:
                        problems.append(f"{key}: missing attribute {attr!r}")
                if "order" in dataset.attrs:
                    order = int(dataset.attrs["order"])
                    if order in orders:
                        problems.append(f"{key}: order {order} also used by {orders[order]}")
                    orders[order] = key
                dtype = str(dataset.attrs.get("dtype", ""))
                if dtype and dtype not in LOGICAL_DTYPES:
                    problems.append(f"{key}: dtype {dtype!r} is not one of {sorted(LOGICAL_DTYPES)}")
                elif dtype:
                    expected = _STORED_AS.get(dtype, np.dtype(dtype))
                    if dataset.dtype != expected:
                        problems.append(f"{key}: stored as {dataset.dtype}, expected {expected} for {dtype}")
                if str(dataset.attrs.get("kind", "")) not in KINDS:
                    problems.append(f"{key}: kind must be one of {KINDS}")
                if "layout" in dataset.attrs and (dataset.attrs["layout"] != "channels_last" or dataset.ndim != 4):
                    problems.append(f"{key}: layout may only be channels_last, on a 4-D tensor")
    return problems
