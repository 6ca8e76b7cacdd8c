"""Limits and checks for untrusted run data, shared by every run-file form (HDF5, folders of tensors).

A run file comes from another program (a port in any language, a CI artifact, a download), so
readers check it before they trust it: JSON documents (metadata, index) are bounded in size and
nesting, names in length, shapes in rank, and a tensor may take at most `expansion` times the size of
its file in memory (a compressed "bomb", or a chunked dataset with nothing stored, is refused
rather than expanded into RAM). Every limit can be raised, per process with the environment
variables below or per reader with a `Limits` object; docs/run-format.md lists them.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from sd_parity.errors import BadInput, RunFileError

# the environment variable that sets each limit
ENV = {
    "metadata_bytes": "SD_PARITY_MAX_METADATA_BYTES",
    "metadata_depth": "SD_PARITY_MAX_METADATA_DEPTH",
    "index_bytes": "SD_PARITY_MAX_INDEX_BYTES",
    "tensors": "SD_PARITY_MAX_TENSORS",
    "name_length": "SD_PARITY_MAX_NAME_LENGTH",
    "ndim": "SD_PARITY_MAX_NDIM",
    "expansion": "SD_PARITY_MAX_EXPANSION",
    "expansion_floor": "SD_PARITY_EXPANSION_FLOOR_BYTES",
}


@dataclass(frozen=True)
class Limits:
    metadata_bytes: int = 1 << 20  # the metadata JSON (ours: ~2 KB)
    metadata_depth: int = 32  # nesting of the metadata JSON (ours: 3)
    index_bytes: int = 256 << 20  # the tensor index JSON (~150 bytes a tensor)
    tensors: int = 1_000_000  # tensors in one run (an SD 1.5 all-tensor capture: ~60,000)
    name_length: int = 1024  # characters in a tensor name (ours: < 120)
    ndim: int = 8  # dimensions of a tensor (ours: <= 4)
    expansion: float = 64.0  # a tensor may take this many times its file's size in memory ...
    expansion_floor: int = 256 << 20  # ... or this many bytes, whichever is larger

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Limits":
        """The defaults, overridden by the SD_PARITY_MAX_* variables that are set."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = ENV[field.name]
            text = environ.get(name)
            if text is None or not text.strip():
                continue
            kind = float if field.type in ("float", float) else int
            try:
                value = kind(text)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise BadInput(f"{name}={text!r} is not a positive {kind.__name__}; unset it or give a number")
            values[field.name] = value
        return cls(**values)


def json_document(text: str | bytes, limit_bytes: int, depth: int, what: str) -> Any:
    """Parse untrusted JSON: bounded in size and nesting, or RunFileError saying which limit and how to raise it."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > limit_bytes:
        raise RunFileError(f"{what} is {size} bytes, more than the limit of {limit_bytes} "
                           f"(raise it with {_env_for(what)} if the file is genuine)")
    try:
        value = json.loads(text)
    except RecursionError:
        raise RunFileError(f"{what} is nested too deeply to parse (the limit is {depth} levels)") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFileError(f"{what} is not valid JSON ({exc})") from None
    found = json_depth(value)
    if found > depth:
        raise RunFileError(f"{what} is nested {found} levels deep, more than the limit of {depth} "
                           f"(raise it with {_env_for(what)} if the file is genuine)")
    return value


def _env_for(what: str) -> str:
    return ENV["index_bytes"] if "index" in what else f"{ENV['metadata_bytes']} / {ENV['metadata_depth']}"


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_metadata(text: str | bytes, limits: Limits, where: str = "metadata") -> dict[str, Any]:
    """A run's metadata: a JSON object within the limits, or RunFileError."""
    value = json_document(text, limits.metadata_bytes, limits.metadata_depth, where)
    if not isinstance(value, dict):
        raise RunFileError(f"{where} is a JSON {type(value).__name__}, not an object")
    return value


def name_problem(name: Any, limits: Limits) -> str | None:
    """Why `name` cannot be a tensor name (None when it can): a non-empty string without '/' or NUL."""
    if not isinstance(name, str) or not name:
        return "names are non-empty strings"
    if "/" in name or "\x00" in name:
        return "names contain no '/' and no NUL"
    if len(name) > limits.name_length:
        return f"the name is {len(name)} characters long, more than the limit of {limits.name_length} ({ENV['name_length']})"
    return None


def shape_problem(shape: Any, limits: Limits) -> str | None:
    """Why `shape` is not a tensor shape (None when it is): non-negative integers, at most `ndim` of them."""
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if len(shape) > limits.ndim:
        return f"{len(shape)} dimensions, more than the limit of {limits.ndim} ({ENV['ndim']})"
    return None


def nbytes_of(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes a tensor of `shape` takes in memory (Python integers: no overflow)."""
    return math.prod(int(n) for n in shape) * itemsize


def expansion_problem(nbytes: int, file_bytes: int, limits: Limits) -> str | None:
    """Why a tensor of `nbytes` may not be loaded from a file of `file_bytes` (None when it may)."""
    allowed = max(limits.expansion_floor, limits.expansion * file_bytes)
    if nbytes <= allowed:
        return None
    return (f"it would take {nbytes} bytes in memory, more than {limits.expansion:g} times the file's "
            f"{file_bytes} bytes (a compressed bomb or a dataset with missing data); if the file is genuine "
            f"raise {ENV['expansion']} or {ENV['expansion_floor']}")
