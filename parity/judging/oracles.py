"""The fp64 oracle runs a comparison calibrates against, looked up tensor by tensor.

A free run is calibrated against one oracle: the reference pipeline run in fp64. An isolated run is
calibrated against two, in order: the block-local oracle (each reference block re-run in fp64 on the
reference's own captured inputs, so a block's threshold measures the reference's error in that block
alone, on the very inputs the candidate was fed) and, for tensors outside blocks, the fp64 run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sd_parity.runs.hdf5 import Entry, RunReader


class Oracles:
    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.readers: list[RunReader] = []
        try:
            for path in paths:
                self.readers.append(RunReader(path))
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        """The whole-run oracle's path (the last one)."""
        return self.readers[-1].path

    @property
    def paths(self) -> list[Path]:
        return [reader.path for reader in self.readers]

    @property
    def metadata(self) -> dict:
        return self.readers[-1].metadata  # the whole-run oracle's, when there are two

    def holds(self, key: str) -> bool:
        return any(key in reader for reader in self.readers)

    def find(self, key: str, shape: tuple[int, ...]) -> tuple[RunReader, Entry] | None:
        """The first oracle holding `key` with `shape`."""
        for reader in self.readers:
            if key in reader and tuple(reader.entry(key).shape) == tuple(shape):
                return reader, reader.entry(key)
        return None

    def read(self, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, Entry] | None:
        found = self.find(key, shape)
        if found is None:
            return None
        reader, entry = found
        return reader.read(entry), entry

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def oracle_paths(oracle_path) -> list:
    """`oracle_path` as a list: one path, or a sequence of paths (most specific first)."""
    if oracle_path is None:
        return []
    if isinstance(oracle_path, (str, os.PathLike)):
        return [oracle_path]
    return list(oracle_path)
