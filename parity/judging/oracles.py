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
from sd_parity.runs.open import open_run


class Oracles:
    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.readers: list[RunReader] = []
        try:
            for path in paths:
                self.readers.append(open_run(path))
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

    def warnings(self, ref: RunReader, setting_keys: tuple[str, ...]) -> list[str]:
        """What makes an oracle unfit for `ref`: another dtype than fp64, other settings, another x_T.

        x_T is compared by value: an fp16 reference starts from the fixture's x_T rounded to fp16 (its
        metadata hashes those values), while the oracle starts from the fixture's x_T itself."""
        warnings = []
        for reader in self.readers:
            meta, name = reader.metadata, reader.path.name
            if meta.get("dtype") not in (None, "fp64", "float64"):
                warnings.append(f"the oracle run {name} has dtype {meta.get('dtype')!r}, not fp64: calibrated "
                                "thresholds assume an fp64 oracle")
            for key in setting_keys:
                if key != "x_T_sha256" and key in ref.metadata and key in meta and ref.metadata[key] != meta[key]:
                    warnings.append(f"oracle {name} and reference differ in {key}: {meta[key]!r} vs "
                                    f"{ref.metadata[key]!r}")
            x_t = "pipeline/main/x_T"
            if x_t in ref and x_t in reader and not _rounds_to(reader.read(x_t), ref.read(x_t)):
                warnings.append(f"oracle {name} starts from another x_T than the reference (not even after "
                                "rounding to the reference's dtype)")
        return warnings

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _rounds_to(exact: np.ndarray, rounded: np.ndarray) -> bool:
    return exact.shape == rounded.shape and bool(np.array_equal(exact.astype(rounded.dtype), rounded))


def oracle_paths(oracle_path) -> list:
    """`oracle_path` as a list: one path, or a sequence of paths (most specific first)."""
    if oracle_path is None:
        return []
    if isinstance(oracle_path, (str, os.PathLike)):
        return [oracle_path]
    return list(oracle_path)
