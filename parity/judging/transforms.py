"""How a candidate may hold a tensor differently from the reference, and how to undo it before comparing.

A Transform is what a name map's `layout`, `batch` and `broadcast` keys say (docs/maps.md); the
diagnosis tries the same transforms to explain a mismatch and suggests the key that would undo it.
Each step applies only where it fits the tensor (`nhwc` to a 4-D tensor, `batch` to a batch that
splits into the given number of chunks), so one [[transform]] table can cover a whole component.
Steps run in a fixed order: batch, then layout, then broadcast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

LAYOUTS = {
    "nhwc": "the candidate holds (N, H, W, C) where the reference holds (N, C, H, W)",
    "tokens": "one side holds tokens (B, H*W, C), the other a feature map (B, C, H, W)",
    "reshape": "the same elements in the same order, under another shape",
}
KEYS = ("layout", "batch", "broadcast")


class TransformError(ValueError):
    """A transform written wrongly in a name map."""


@dataclass(frozen=True)
class Transform:
    layout: tuple[str, ...] = ()  # LAYOUTS steps, in order (a single name is one step)
    batch: tuple[int, ...] | None = None  # candidate chunk i along axis 0 holds reference chunk batch[i]
    broadcast: bool = False  # size-1 axes of the candidate stand for the reference's repeated values

    def __post_init__(self):
        if isinstance(self.layout, str) or self.layout is None:
            object.__setattr__(self, "layout", (self.layout,) if self.layout else ())

    def __bool__(self) -> bool:
        return bool(self.layout or self.batch or self.broadcast)

    def shape(self, shape: tuple[int, ...], ref_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The candidate's shape after this transform (ref_shape decides where a step fits)."""
        shape, ref_shape = tuple(shape), tuple(ref_shape)
        for layout in self.layout:
            if layout == "nhwc" and len(shape) == 4:
                shape = (shape[0], shape[3], shape[1], shape[2])
            elif layout == "tokens":
                shape = _tokens_shape(shape, ref_shape) or shape
            elif layout == "reshape" and math.prod(shape) == math.prod(ref_shape):
                shape = ref_shape
        if self.broadcast and shape != ref_shape and _broadcastable(shape, ref_shape):
            shape = ref_shape
        return shape

    def apply(self, array: np.ndarray, ref_shape: tuple[int, ...]) -> np.ndarray:
        ref_shape = tuple(ref_shape)
        if self.batch and _batch_fits(array.shape, len(self.batch)):
            chunks = np.split(array, len(self.batch), axis=0)
            ordered = [None] * len(chunks)
            for index, target in enumerate(self.batch):
                ordered[target] = chunks[index]
            array = np.concatenate(ordered, axis=0)
        for layout in self.layout:
            if layout == "nhwc" and array.ndim == 4:
                array = array.transpose(0, 3, 1, 2)
            elif layout == "tokens" and _tokens_shape(array.shape, ref_shape):
                if array.ndim == 3:  # (B, H*W, C) -> (B, C, H, W)
                    batch, _, channels = array.shape
                    array = array.reshape(batch, ref_shape[2], ref_shape[3], channels).transpose(0, 3, 1, 2)
                else:  # (B, C, H, W) -> (B, H*W, C)
                    batch, channels, height, width = array.shape
                    array = array.transpose(0, 2, 3, 1).reshape(batch, height * width, channels)
            elif layout == "reshape" and array.size == math.prod(ref_shape):
                array = array.reshape(ref_shape)
        if self.broadcast and array.shape != ref_shape and _broadcastable(array.shape, ref_shape):
            array = np.broadcast_to(array, ref_shape)
        return array

    def describe(self) -> str:
        return ", ".join(f"{key} = {_toml_value(value)}" for key, value in self.toml().items())

    def toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.batch:
            out["batch"] = list(self.batch)
        if self.layout:
            out["layout"] = self.layout[0] if len(self.layout) == 1 else list(self.layout)
        if self.broadcast:
            out["broadcast"] = True
        return out


Chain = tuple[Transform, ...]


def chain_shape(shape: tuple[int, ...], chain: Chain, ref_shape: tuple[int, ...]) -> tuple[int, ...]:
    for transform in chain:
        shape = transform.shape(shape, ref_shape)
    return tuple(shape)


def apply_chain(array: np.ndarray, chain: Chain, ref_shape: tuple[int, ...]) -> np.ndarray:
    for transform in chain:
        array = transform.apply(array, ref_shape)
    return array


def parse_transform(raw: dict, label: str) -> Transform | None:
    """The transform keys of one map table (None when it has none); TransformError says what is wrong."""
    layout = raw.get("layout", ())
    steps = [layout] if isinstance(layout, str) else layout
    if not isinstance(steps, list | tuple) or any(step not in LAYOUTS for step in steps):
        raise TransformError(f"{label}: layout = {layout!r}; use one of "
                             + "; ".join(f'"{k}" ({v})' for k, v in LAYOUTS.items())
                             + ", or a list of them applied in order")
    batch = raw.get("batch")
    if batch is not None:
        if (not isinstance(batch, list) or len(batch) < 2 or not all(isinstance(i, int) for i in batch)
                or sorted(batch) != list(range(len(batch)))):
            raise TransformError(f"{label}: batch = {batch!r}; give the reference's chunk order as a permutation, "
                                 "e.g. batch = [1, 0] for a CFG batch ordered [cond, uncond]")
        batch = tuple(batch)
    broadcast = raw.get("broadcast", False)
    if not isinstance(broadcast, bool):
        raise TransformError(f"{label}: broadcast must be true or false")
    transform = Transform(layout=tuple(steps), batch=batch, broadcast=broadcast)
    return transform or None


def split_part(array: np.ndarray, index: int, parts: int, axis: int) -> np.ndarray:
    """Part `index` of `parts` equal chunks of `array` along `axis` (a fused tensor's piece)."""
    return np.split(array, parts, axis=axis)[index]


def split_shape(shape: tuple[int, ...], parts: int, axis: int) -> tuple[int, ...] | None:
    """The shape of one of `parts` equal chunks along `axis`, or None when the axis does not divide."""
    if not shape or not -len(shape) <= axis < len(shape) or shape[axis] % parts:
        return None
    out = list(shape)
    out[axis] //= parts
    return tuple(out)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _batch_fits(shape: tuple[int, ...], chunks: int) -> bool:
    return len(shape) > 0 and shape[0] > 1 and shape[0] % chunks == 0


def _tokens_shape(shape: tuple[int, ...], ref_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(shape) == 3 and len(ref_shape) == 4 and shape[1] == ref_shape[2] * ref_shape[3]:
        return (shape[0], shape[2], ref_shape[2], ref_shape[3])
    if len(shape) == 4 and len(ref_shape) == 3 and shape[2] * shape[3] == ref_shape[1]:
        return (shape[0], shape[2] * shape[3], shape[1])
    return None


def _broadcastable(shape: tuple[int, ...], ref_shape: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(tuple(shape), tuple(ref_shape)) == tuple(ref_shape)
    except ValueError:
        return False
