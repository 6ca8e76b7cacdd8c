"""A run in either form, by path: an HDF5 run file, or a run folder of .npy/.safetensors files."""
from __future__ import annotations

import os
from pathlib import Path

from .directory import DirectoryRunReader, validate_directory
from .hdf5 import RunReader, validate


def open_run(path: str | os.PathLike) -> RunReader:
    """A reader for the run at `path`: a folder is the directory form, anything else an HDF5 run file."""
    return DirectoryRunReader(path) if Path(path).is_dir() else RunReader(path)


def validate_run(path: str | os.PathLike) -> list[str]:
    """Every way the run at `path` (either form) breaks the format; empty when it is valid."""
    return validate_directory(path) if Path(path).is_dir() else validate(path)


def copy_run(reader: RunReader, writer, keys=None) -> int:
    """Copy `reader`'s tensors (all, or those whose key is in `keys`) into a run writer of either form,
    in execution order with their layouts; returns how many were copied. The caller closes the writer."""
    copied = 0
    for entry in reader.entries():
        if keys is None or entry.key in keys:
            writer.write(entry.component, entry.invocation, entry.name, reader.read(entry), layout=entry.layout)
            copied += 1
    return copied
