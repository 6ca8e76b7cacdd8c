"""A component's weights by diffusers/transformers name, checked against what the model asks for.

The model code requests every weight with the shape its config implies (`Scope.weight`); the store
records missing and mis-shaped requests instead of failing on the first, and `finish()` raises one
ModelInputError listing missing, unexpected and mis-shaped keys (the first few of each, and counts).
Arrays are handed out as stored (memory-mapped views when the file allows it): no copies here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import ModelInputError

_SHOW = 5  # keys listed per kind of problem


class WeightStore:
    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "weights"):
        self.tensors = tensors
        self.source = source
        self._taken: set[str] = set()
        self._ignored: set[str] = set()
        self._missing: list[tuple[str, tuple[int, ...]]] = []
        self._misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    @classmethod
    def from_file(cls, path: str | Path) -> "WeightStore":
        from .tensor_files import open_tensor_file

        return cls(open_tensor_file(path), source=str(path))

    def has(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors.keys())

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """The array stored under `key`, or None (recorded) when it is missing or not of `shape`."""
        if key not in self.tensors:
            self._missing.append((key, tuple(shape or ())))
            return None
        self._taken.add(key)
        array = self.tensors[key]
        if shape is not None and tuple(array.shape) != tuple(shape):
            self._misshaped.append((key, tuple(array.shape), tuple(shape)))
            return None
        return array

    def ignore(self, key: str) -> None:
        self._ignored.add(key)

    def ignore_prefix(self, prefix: str) -> None:
        self._ignored.update(k for k in self.tensors.keys() if k.startswith(prefix))

    def unexpected(self) -> list[str]:
        return sorted(k for k in self.tensors.keys() if k not in self._taken and k not in self._ignored)

    def finish(self, hint: str = "") -> None:
        """Raise one ModelInputError if any weight was missing, mis-shaped or left unused."""
        unexpected = self.unexpected()
        if not (self._missing or self._misshaped or unexpected):
            return
        parts = []
        if self._missing:
            shown = ", ".join(f"{k} {list(s)}" for k, s in self._missing[:_SHOW])
            more = f" (+{len(self._missing) - _SHOW} more)" if len(self._missing) > _SHOW else ""
            parts.append(f"{len(self._missing)} missing: {shown}{more}")
        if self._misshaped:
            shown = ", ".join(f"{k} is {list(got)}, expected {list(want)}" for k, got, want in self._misshaped[:_SHOW])
            more = f" (+{len(self._misshaped) - _SHOW} more)" if len(self._misshaped) > _SHOW else ""
            parts.append(f"{len(self._misshaped)} mis-shaped: {shown}{more}")
        if unexpected:
            more = f" (+{len(unexpected) - _SHOW} more)" if len(unexpected) > _SHOW else ""
            parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:_SHOW])}{more}")
        hint = hint or "the weights do not match the architecture config.json describes"
        raise ModelInputError(f"{self.source}: {'; '.join(parts)}. {hint}")


__all__ = ["WeightStore"]
