"""The directory form of a run: plain `.npy` / `.safetensors` files and a small `run.json`, for ports
written in languages where HDF5 is a chore (docs/run-format.md, "The directory form", is normative).

    RUN/
      run.json                                 {"format": "sd-parity-run", "format_version": 1,
                                                "metadata": {...}, "tensors": [KEY or {"key", "dtype", "layout"}]}
      <component>/<invocation>/<name>.npy       one tensor per file (NumPy format, no pickles)
      <anything>.safetensors                   any number of tensors, each under its KEY
                                               "<component>/<invocation>/<name>"

`tensors` in run.json is the execution order. Without it, a tensor's file stem (or safetensors key's
last part) may start with its order, `<order>__<name>`; without either, tensors are listed by key.
run.json itself is optional (metadata is then empty): a writer that can, writes it last.

The folder is untrusted input. Everything the reader accepts from it is bounded by the limits every run
form shares (runs/limits.py: the manifest's size and nesting, tensor count, name length, rank) and
checked in `scan`: file kinds and places, names, dtypes, shapes, sizes against the file's length, links
(a link leaving the folder, or to a folder, is refused). Tensors are stored uncompressed, so a
tensor's memory is its file's size: no expansion limit is needed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from sd_parity.impl.errors import ModelInputError
from sd_parity.impl.tensor_files import SafetensorsFile, write_safetensors

from .hdf5 import (COMPONENTS, FORMAT, FORMAT_VERSION, INVOCATION_RE, LOGICAL_DTYPES, WRITE_LIMITS, Entry, RunFileError,
                   RunReader, Writer, kind_of, logical_dtype)
from .limits import Limits, json_document, name_problem, nbytes_of, shape_problem

MANIFEST = "run.json"
NPY, SAFETENSORS = ".npy", ".safetensors"
TENSOR_FORMATS = ("npy", "safetensors")
BFLOAT16_BITS = "uint16"  # not a run dtype: only bfloat16 declared in run.json over its raw bits
ORDER_PREFIX = re.compile(r"^(\d{1,12})__(.+)$")
IGNORED_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})  # put there by file browsers
SHOWN_PROBLEMS = 20


# The layout is <component>/<invocation>/<file>: deeper folders are not part of the format.
FOLDER_DEPTH = 3
NPY_HEADER_BYTES = 10_000  # NumPy's own default bound on .npy headers


@dataclass(frozen=True)
class _Location:
    """Where a tensor's bytes are: a .npy file, or a key in an open safetensors file."""

    path: Path
    key: str | None = None  # the safetensors key; None for .npy


@dataclass
class _Stored:
    key: str
    component: str
    invocation: str
    name: str
    order: int | None  # from an `<order>__` prefix
    dtype: str
    shape: tuple[int, ...]
    location: _Location


@dataclass
class Index:
    """What `scan` found in a run folder; `problems` empty means it is a valid run."""

    metadata: dict[str, Any] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    locations: dict[str, _Location] = field(default_factory=dict)
    order_source: str = "key order"  # "run.json", "file names" or "key order"
    problems: list[str] = field(default_factory=list)
    safetensors: dict[Path, SafetensorsFile] = field(default_factory=dict)


def key_problem(component: str, invocation: str, name: str, limits: Limits) -> str | None:
    """Why (component, invocation, name) cannot name a tensor, or None when it can."""
    if component not in COMPONENTS:
        return f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}"
    if not INVOCATION_RE.match(invocation):
        return f"bad invocation {invocation!r} in {component}; expected main, call_N or step_NNN"
    problem = name_problem(name, limits)
    return f"bad tensor name {name!r} in {component}/{invocation}: {problem}" if problem else None


# --- reading -----------------------------------------------------------------------------------------
def scan(root: str | os.PathLike, limits: Limits | None = None) -> Index:
    """Index a run folder without reading tensor data, checking everything against `limits` (default:
    the SD_PARITY_MAX_* limits)."""
    root = Path(root)
    limits = limits or Limits.from_env()
    index = Index()
    if not root.is_dir():
        index.problems.append(f"{root} is not a folder")
        return index
    manifest = _read_manifest(root, limits, index.problems)
    stored: dict[str, _Stored] = {}
    for path in _files(root, limits, index.problems):
        relative = path.relative_to(root)
        if relative.name in IGNORED_FILES or relative.as_posix() == MANIFEST:
            continue
        if path.suffix == NPY:
            found = _npy_tensor(root, relative, limits, index.problems)
            found = [found] if found else []
        elif path.suffix == SAFETENSORS:
            found = _safetensors_tensors(path, relative, limits, index)
        else:
            index.problems.append(f"{relative}: not a tensor file; a run folder holds run.json, .npy and "
                                  ".safetensors files only")
            continue
        for tensor in found:
            if tensor.key in stored:
                index.problems.append(f"{tensor.key} is stored twice ({stored[tensor.key].location.path.name} "
                                      f"and {tensor.location.path.name})")
            stored[tensor.key] = tensor
    if manifest is not None:
        index.metadata = manifest.get("metadata", {})
    listing = manifest.get("tensors") if manifest is not None else None
    if listing is not None:
        ordered = _order_by_manifest(listing, stored, index.problems)
        index.order_source = "run.json"
    else:
        ordered = _order_by_names(stored, index.problems)
        index.order_source = "file names" if any(t.order is not None for t in stored.values()) else "key order"
    for order, (tensor, dtype, layout) in enumerate(ordered):
        if dtype == BFLOAT16_BITS:
            index.problems.append(f"{tensor.key}: uint16 is not a run dtype; for bfloat16 stored as its bits, "
                                  f"declare {{\"key\": \"{tensor.key}\", \"dtype\": \"bfloat16\"}} in {MANIFEST}")
            continue
        index.entries.append(Entry(tensor.component, tensor.invocation, tensor.name, order, dtype, tensor.shape,
                                   kind_of(tensor.component, tensor.name), layout))
        index.locations[tensor.key] = tensor.location
    if manifest is None and not stored and not index.problems:
        index.problems.append(f"{root} holds neither {MANIFEST} nor tensor files: not a run folder")
    del index.problems[SHOWN_PROBLEMS:]
    return index


def validate_directory(root: str | os.PathLike, limits: Limits | None = None) -> list[str]:
    """Every way the folder breaks the run format (empty when it is a valid run)."""
    return scan(root, limits).problems


def _read_manifest(root: Path, limits: Limits, problems: list[str]) -> dict | None:
    path = root / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        problems.append(f"{MANIFEST} must be a plain file")
        return None
    try:
        manifest = json_document(path.read_bytes(), limits.index_bytes, limits.metadata_depth, MANIFEST)
    except RunFileError as exc:
        problems.append(str(exc))
        return None
    if not isinstance(manifest, dict):
        problems.append(f"{MANIFEST} is not a JSON object")
        return None
    if manifest.get("format") != FORMAT:
        problems.append(f"{MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"{MANIFEST}: format_version is {manifest.get('format_version')!r}; this reader "
                        f"understands {FORMAT_VERSION}")
    if manifest.get("complete", True) is not True:
        problems.append(f"{MANIFEST} says complete={manifest.get('complete')!r}: the writer did not finish")
    if not isinstance(manifest.get("metadata", {}), dict):
        problems.append(f"{MANIFEST}: metadata must be a JSON object")
        manifest["metadata"] = {}
    if "tensors" in manifest and not isinstance(manifest["tensors"], list):
        problems.append(f"{MANIFEST}: tensors must be a list of keys in execution order")
        manifest["tensors"] = []
    return manifest


def _files(root: Path, limits: Limits, problems: list[str]) -> list[Path]:
    """The regular files under `root`; links are followed only to files inside `root`."""
    real_root = root.resolve()
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root, followlinks=False):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        for sub in list(subfolders):
            if (here / sub).is_symlink():
                problems.append(f"{(here / sub).relative_to(root)}: links to folders are not followed")
                subfolders.remove(sub)
            elif depth + 1 >= FOLDER_DEPTH:
                problems.append(f"{(here / sub).relative_to(root)}: nested deeper than "
                                "<component>/<invocation>/<file>")
                subfolders.remove(sub)
        for name in names:
            path = here / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(real_root):
                    problems.append(f"{path.relative_to(root)} links outside the run folder (to {target})")
                    continue
                if not target.is_file():
                    problems.append(f"{path.relative_to(root)} links to something that is not a file")
                    continue
            elif not path.is_file():
                problems.append(f"{path.relative_to(root)} is not a regular file")
                continue
            files.append(path)
            if len(files) > limits.tensors:
                problems.append(f"more than {limits.tensors} files, the limit of tensors in a run "
                                "(SD_PARITY_MAX_TENSORS)")
                return []
    return sorted(files)


def _split_order(stem: str) -> tuple[int | None, str]:
    match = ORDER_PREFIX.match(stem)
    return (int(match.group(1)), match.group(2)) if match else (None, stem)


def _npy_tensor(root: Path, relative: Path, limits: Limits, problems: list[str]) -> _Stored | None:
    if len(relative.parts) != 3:
        problems.append(f"{relative}: a .npy file goes in <component>/<invocation>/<name>.npy")
        return None
    component, invocation = relative.parts[:2]
    order, name = _split_order(relative.name[:-len(NPY)])
    problem = key_problem(component, invocation, name, limits)
    if problem:
        problems.append(f"{relative}: {problem}")
        return None
    path = root / relative
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _fortran, stored = read_header(handle, max_header_size=NPY_HEADER_BYTES)
            data_start = handle.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        problems.append(f"{relative}: not a readable .npy file ({exc})")
        return None
    dtype = _logical(stored)
    if dtype is None:
        problems.append(f"{relative}: dtype {stored} is not a run dtype ({', '.join(sorted(LOGICAL_DTYPES))}; "
                        "bfloat16 as uint16 bits)")
        return None
    problem = shape_problem(shape, limits)
    if problem:
        problems.append(f"{relative}: {problem}")
        return None
    expected = data_start + nbytes_of(shape, stored.itemsize)
    size = path.stat().st_size
    if size != expected:
        problems.append(f"{relative}: {size} bytes, but its header says {expected} (truncated or padded file)")
        return None
    return _Stored(f"{component}/{invocation}/{name}", component, invocation, name, order, dtype, tuple(shape),
                   _Location(path))


def _logical(stored: np.dtype) -> str | None:
    """The run dtype of a stored NumPy dtype (either byte order); 2-byte voids are ml_dtypes' bfloat16."""
    if stored.hasobject or stored.fields is not None or stored.subdtype is not None:
        return None
    if stored == ml_dtypes.bfloat16 or (stored.kind == "V" and stored.itemsize == 2):
        return "bfloat16"
    name = stored.newbyteorder("=").name if stored.byteorder in "<>" else stored.name
    return name if name in LOGICAL_DTYPES or name == BFLOAT16_BITS else None


def _safetensors_tensors(path: Path, relative: Path, limits: Limits, index: Index) -> list[_Stored]:
    try:
        file = SafetensorsFile(path)
    except (ModelInputError, OSError, ValueError) as exc:
        index.problems.append(f"{relative}: not a readable safetensors file ({exc})")
        return []
    index.safetensors[path] = file
    found = []
    for key in file:
        parts = key.split("/", 2)
        if len(parts) != 3:
            index.problems.append(f"{relative}: key {key!r} is not <component>/<invocation>/<name>")
            continue
        component, invocation, stem = parts
        order, name = _split_order(stem)
        problem = key_problem(component, invocation, name, limits)
        array = file[key]
        problem = problem or shape_problem(array.shape, limits)
        dtype = _logical(array.dtype)
        if problem or dtype is None:
            index.problems.append(f"{relative}: {key}: {problem or f'dtype {array.dtype} is not a run dtype'}")
            continue
        found.append(_Stored(f"{component}/{invocation}/{name}", component, invocation, name, order, dtype,
                             tuple(array.shape), _Location(path, key)))
    return found


def _order_by_manifest(listing: list, stored: dict[str, _Stored], problems: list[str]) -> list:
    ordered, seen = [], set()
    for item in listing:
        spec = {"key": item} if isinstance(item, str) else item
        if not isinstance(spec, dict) or not isinstance(spec.get("key"), str):
            problems.append(f"{MANIFEST}: tensors entry {item!r} is neither a key nor an object with a key")
            continue
        key = spec["key"]
        if key in seen:
            problems.append(f"{MANIFEST} lists {key} twice")
            continue
        seen.add(key)
        tensor = stored.get(key)
        if tensor is None:
            problems.append(f"{MANIFEST} lists {key}, which is not stored (expected {key}.npy or a safetensors "
                            "key)")
            continue
        dtype = spec.get("dtype", tensor.dtype)
        if dtype != tensor.dtype and not (dtype == "bfloat16" and tensor.dtype == BFLOAT16_BITS):
            problems.append(f"{key}: {MANIFEST} says dtype {dtype!r}, the file holds {tensor.dtype} "
                            "(only bfloat16 may be declared over uint16 bits)")
            continue
        layout = spec.get("layout")
        if layout is not None and (layout != "channels_last" or len(tensor.shape) != 4):
            problems.append(f"{key}: layout may only be channels_last, on a 4-D tensor")
            continue
        ordered.append((tensor, dtype, layout))
    unlisted = [key for key in stored if key not in seen]
    if unlisted:
        problems.append(f"{len(unlisted)} stored tensor(s) missing from {MANIFEST}'s tensors list "
                        f"(first: {unlisted[0]}); list every tensor or leave the list out")
    return ordered


def _order_by_names(stored: dict[str, _Stored], problems: list[str]) -> list:
    tensors = list(stored.values())
    prefixed = [t for t in tensors if t.order is not None]
    if prefixed and len(prefixed) != len(tensors):
        bare = next(t.key for t in tensors if t.order is None)
        problems.append(f"{len(tensors) - len(prefixed)} tensor(s) lack the <order>__ prefix the others have "
                        f"(first: {bare})")
    by_order: dict[int, str] = {}
    for tensor in prefixed:
        if tensor.order in by_order:
            problems.append(f"order {tensor.order} is used by {by_order[tensor.order]} and {tensor.key}")
        by_order[tensor.order] = tensor.key
    tensors.sort(key=lambda t: (t.order if t.order is not None else -1, t.key))
    return [(t, t.dtype, None) for t in tensors]


class DirectoryRunReader(RunReader):
    """RunReader over a run folder. It keeps RunReader's index methods (entries, entry, components,
    invocations, `in`) and reads tensors from the folder's files instead of an HDF5 file."""

    def __init__(self, path: str | os.PathLike, limits: Limits | None = None):
        self.path = Path(path)
        index = scan(self.path, limits)
        if index.problems:
            raise RunFileError(f"{self.path} is not a valid run folder: " + "; ".join(index.problems[:5]))
        self.metadata = index.metadata
        self.order_source = index.order_source
        self._entries = index.entries
        self._by_key = {e.key: e for e in self._entries}
        self._locations = index.locations
        self._safetensors = index.safetensors

    def read(self, key: str | Entry, restore_layout: bool = False) -> np.ndarray:
        entry = key if isinstance(key, Entry) else self._by_key[key]
        location = self._locations[entry.key]
        if location.key is None:
            try:
                data = np.load(location.path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise RunFileError(f"reading {location.path} failed: {exc}") from exc
        else:
            data = np.array(self._safetensors[location.path][location.key])
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(data)
        if entry.dtype == "bfloat16":  # stored as bfloat16, uint16 bits or NumPy's 2-byte void: same bits
            data = data.view(ml_dtypes.bfloat16)
        if restore_layout and entry.layout == "channels_last":
            data = np.ascontiguousarray(data.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        return data

    def close(self) -> None:
        self._safetensors = {}


# --- writing -----------------------------------------------------------------------------------------
class DirectoryRunWriter(Writer):
    """Writes a run folder; the same interface as RunWriter, so a Recorder can stream into it.

    The folder is written under a temporary name beside `path`; run.json goes last and the folder is
    renamed into place on `close()`, so a failed write never leaves a folder that looks complete. An
    existing run folder at `path` is replaced; any other existing folder is refused."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any], tensor_format: str = "npy"):
        self.path = Path(path)
        if tensor_format not in TENSOR_FORMATS:
            raise RunFileError(f"unknown tensor format {tensor_format!r}; use {' or '.join(TENSOR_FORMATS)}")
        parent = self.path.parent
        if not parent.is_dir():
            raise RunFileError(f"output folder {parent} does not exist; create it or choose another output")
        if self.path.exists() and not (self.path.is_dir() and (not any(self.path.iterdir())
                                                                 or (self.path / MANIFEST).is_file())):
            raise RunFileError(f"{self.path} exists and is not a run folder; choose a new folder")
        self._format = tensor_format
        self._metadata = json.loads(json.dumps(metadata, default=str))
        self._listing: list[str | dict] = []
        self._seen: set[str] = set()
        self._bytes = 0
        self._tmp = parent / f".{self.path.name}.tmp-{os.getpid()}"
        shutil.rmtree(self._tmp, ignore_errors=True)
        try:
            self._tmp.mkdir()
        except OSError as exc:
            raise RunFileError(f"cannot create {self._tmp}: {exc}") from exc

    @property
    def tensors_written(self) -> int:
        return len(self._listing)

    @property
    def bytes_written(self) -> int:
        return self._bytes

    def update_metadata(self, **fields: Any) -> None:
        self._metadata.update(json.loads(json.dumps(fields, default=str)))

    def write(self, component: str, invocation: str, name: str, array: np.ndarray, layout: str | None = None) -> None:
        problem = key_problem(component, invocation, name, WRITE_LIMITS)
        if problem:
            raise RunFileError(problem)
        key = f"{component}/{invocation}/{name}"
        if key in self._seen:
            raise RunFileError(f"tensor {key} written twice")
        if layout not in (None, "channels_last") or (layout and np.ndim(array) != 4):
            raise RunFileError(f"layout {layout!r} for {key}: only channels_last, on a 4-D tensor, is recorded")
        array = np.ascontiguousarray(array)
        dtype = logical_dtype(array)
        folder = self._tmp / component / invocation
        folder.mkdir(parents=True, exist_ok=True)
        try:
            if self._format == "npy":
                stored = array.view(np.uint16) if dtype == "bfloat16" else array
                with open(folder / f"{name}{NPY}", "wb") as handle:
                    np.lib.format.write_array(handle, stored, allow_pickle=False)
            else:
                write_safetensors(folder / f"{name}{SAFETENSORS}", {key: array})
        except OSError as exc:
            raise RunFileError(f"writing {key} into {self._tmp} failed: {exc} (is the disk full?)") from exc
        self._seen.add(key)
        self._bytes += array.nbytes
        extra = {k: v for k, v in (("dtype", dtype if dtype == "bfloat16" and self._format == "npy" else None),
                                   ("layout", layout)) if v}
        self._listing.append({"key": key, **extra} if extra else key)

    def close(self) -> Path:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
                    "metadata": self._metadata, "tensors": self._listing}
        try:
            (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
            old = None
            if self.path.exists():
                old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
                os.replace(self.path, old)
            os.replace(self._tmp, self.path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            self.abort()
            raise RunFileError(f"finishing {self.path} failed: {exc}") from exc
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
