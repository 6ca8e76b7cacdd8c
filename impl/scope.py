"""Scopes: one object names a module for both its weights and its taps (candle's `vs.pp("norm1")`).

    s = root.pp("down_blocks").pp(1).pp("attentions").pp(0)
    s.pp("proj_in").weight("weight", (64, 64, 1, 1))   # weight "down_blocks.1.attentions.0.proj_in.weight"
    s.tap(value)                                        # taps.output("down_blocks.1.attentions.0", value)

A scope's `path` is the module path relative to the component root, exactly as the reference's
`named_modules()` spells it, so tap names need no mapping table. Weight keys are
`weight_prefix + path + "." + name`: the prefix belongs to the root (the text encoder's weights sit
under `text_model.` in SD folders while its module paths start at ``).

Taps: a model call binds a taps object (anything with `output(path, value)` and
`inputs(path, args)`) to the root for the duration of the call; `tap()` is one attribute test when
none is bound. A root serves one call at a time (do not share one loaded model between threads
that pass different taps).

This module also holds the leaf layers (Linear, Conv2d, GroupNorm, LayerNorm, activations,
dropout) that the CLIP, UNet and VAE code builds from scopes.
"""
from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol

from .errors import ModelInputError


class Taps(Protocol):
    def output(self, path: str, value: Any) -> None: ...

    def inputs(self, path: str, args: dict[str, Any]) -> None: ...


class _Root:
    __slots__ = ("store", "ops", "weight_prefix", "taps")

    def __init__(self, store, ops, weight_prefix: str):
        self.store = store
        self.ops = ops
        self.weight_prefix = weight_prefix
        self.taps: Taps | None = None


class Scope:
    __slots__ = ("_root", "path", "_children")

    def __init__(self, root: _Root, path: str = ""):
        self._root = root
        self.path = path
        self._children: dict[str, Scope] = {}

    @classmethod
    def root(cls, store, ops, weight_prefix: str = "") -> "Scope":
        """The scope of a component root: `store` (impl.weights.WeightStore) holds its weights."""
        return cls(_Root(store, ops, weight_prefix))

    # --- naming -------------------------------------------------------------------------------
    def pp(self, name: str | int) -> "Scope":
        """The child scope `name` (cached: the same object on every call)."""
        key = str(name)
        child = self._children.get(key)
        if child is None:
            child = Scope(self._root, f"{self.path}.{key}" if self.path else key)
            self._children[key] = child
        return child

    @property
    def ops(self):
        return self._root.ops

    @property
    def store(self):
        """The component's WeightStore (the file's tensors by name)."""
        return self._root.store

    def key(self, name: str) -> str:
        return f"{self._root.weight_prefix}{self.path}.{name}" if self.path else f"{self._root.weight_prefix}{name}"

    # --- weights -------------------------------------------------------------------------------
    def weight(self, name: str, shape: tuple[int, ...]):
        """The backend array of weight `name` under this scope, checked against `shape`. A missing or
        mis-shaped weight is recorded by the store (reported all at once by `store.finish()`)."""
        array = self._root.store.take(self.key(name), tuple(shape))
        return None if array is None else self._root.ops.weight(array)

    def has(self, name: str) -> bool:
        return self._root.store.has(self.key(name))

    def ignore(self, name: str) -> None:
        """Accept weight `name` in the file without using it (e.g. stored buffers)."""
        self._root.store.ignore(self.key(name))

    # --- taps ----------------------------------------------------------------------------------
    def tap(self, value):
        """Report `value` as this module's output (when a taps object is bound); returns `value`."""
        taps = self._root.taps
        if taps is not None:
            taps.output(self.path, value)
        return value

    def tap_inputs(self, args: dict[str, Any]) -> None:
        """Report a block's (or the component's) arguments before it computes; None values skipped."""
        taps = self._root.taps
        if taps is not None:
            taps.inputs(self.path, {k: v for k, v in args.items() if v is not None})

    @property
    def tapping(self) -> bool:
        return self._root.taps is not None

    @contextmanager
    def bind(self, taps: Taps | None) -> Iterator[None]:
        """Bind `taps` to the root for one call (a nested call with taps=None keeps the outer ones)."""
        root = self._root
        if taps is None:
            yield
            return
        previous = root.taps
        root.taps = taps
        try:
            yield
        finally:
            root.taps = previous


# ---------------------------------------------------------------------------------------------
# Leaf layers
# ---------------------------------------------------------------------------------------------

class Linear:
    __slots__ = ("s", "ops", "w", "b")

    def __init__(self, s: Scope, in_features: int, out_features: int, bias: bool = True):
        self.s, self.ops = s, s.ops
        self.w = s.weight("weight", (out_features, in_features))
        self.b = s.weight("bias", (out_features,)) if bias else None

    def __call__(self, x):
        return self.s.tap(self.ops.linear(x, self.w, self.b))


class Conv2d:
    __slots__ = ("s", "ops", "w", "b", "stride", "padding")

    def __init__(self, s: Scope, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        self.s, self.ops = s, s.ops
        self.w = s.weight("weight", (out_channels, in_channels, kernel, kernel))
        self.b = s.weight("bias", (out_channels,)) if bias else None
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        return self.s.tap(self.ops.conv2d(x, self.w, self.b, self.stride, self.padding))


class GroupNorm:
    __slots__ = ("s", "ops", "w", "b", "groups", "eps")

    def __init__(self, s: Scope, groups: int, channels: int, eps: float):
        if channels % groups:
            raise ModelInputError(f"{s.path}: {channels} channels do not split into {groups} groups; "
                                  "check norm_num_groups / block_out_channels in config.json")
        self.s, self.ops = s, s.ops
        self.w = s.weight("weight", (channels,))
        self.b = s.weight("bias", (channels,))
        self.groups, self.eps = groups, eps

    def __call__(self, x):
        return self.s.tap(self.ops.group_norm(x, self.groups, self.w, self.b, self.eps))


class LayerNorm:
    __slots__ = ("s", "ops", "w", "b", "eps")

    def __init__(self, s: Scope, dim: int, eps: float):
        self.s, self.ops = s, s.ops
        self.w = s.weight("weight", (dim,))
        self.b = s.weight("bias", (dim,))
        self.eps = eps

    def __call__(self, x):
        return self.s.tap(self.ops.layer_norm(x, self.w, self.b, self.eps))


ACTIVATIONS = ("silu", "swish", "gelu", "quick_gelu")


class Activation:
    """An activation module (no weights): silu/swish, gelu (exact) or quick_gelu."""

    __slots__ = ("s", "fn")

    def __init__(self, s: Scope, kind: str):
        kind = kind.lower()
        if kind not in ACTIVATIONS:
            raise ModelInputError(f"{s.path}: activation {kind!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
        self.s = s
        self.fn: Callable = {"silu": s.ops.silu, "swish": s.ops.silu, "gelu": s.ops.gelu,
                             "quick_gelu": s.ops.quick_gelu}[kind]

    def __call__(self, x):
        return self.s.tap(self.fn(x))


class Dropout:
    """Dropout at inference: the identity, tapped like the reference's Dropout module."""

    __slots__ = ("s",)

    def __init__(self, s: Scope):
        self.s = s

    def __call__(self, x):
        return self.s.tap(x)


# ---------------------------------------------------------------------------------------------
# Components: the uniform block API
# ---------------------------------------------------------------------------------------------

_INDEXED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z_0-9]*)\[(?P<key>[^\[\]]+)\]$")


def unflatten_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Captured input names back to arguments: `res_hidden_states_tuple[0]`, `[1]`, ... become one tuple,
    `added_cond_kwargs[text_embeds]`, `[time_ids]` one dict."""
    args: dict[str, Any] = {}
    items: dict[str, dict[str, Any]] = {}
    for name, value in inputs.items():
        match = _INDEXED.match(name)
        if match:
            items.setdefault(match["name"], {})[match["key"]] = value
        else:
            args[name] = value
    for name, entries in items.items():
        if not all(key.isdigit() for key in entries):
            args[name] = entries
            continue
        indices = sorted(int(key) for key in entries)
        if indices != list(range(len(indices))):
            raise ModelInputError(f"inputs {name}[...] have indices {indices}; expected 0..{len(indices) - 1}")
        args[name] = tuple(entries[str(i)] for i in indices)
    return args


class Component:
    """A network whose blocks can run alone.

    `block_names()`                 the block paths, in execution order
    `block(path)(**inputs, taps=None)`
    `run_block(path, inputs, taps=None)`
                                    run block `path` ("" = the whole component) on inputs named like
                                    the reference's captured `path@argument` tensors (flattened
                                    `res_hidden_states_tuple[0]`... or nested tuples; NumPy arrays or
                                    tensors, converted to the backend and storage dtype) and return
                                    its output in the reference's structure
    `module(path)`                  the block object itself (backend arrays in and out, no conversion)

    Subclasses set `self.scope` (the root scope), `self.ops`, and `self._blocks` (path -> callable
    taking the reference's argument names as keywords and returning the reference's output
    structure; the path "" is the component itself)."""

    name = "component"
    _float32_inputs: tuple[str, ...] = ()  # float inputs kept at float32 whatever the storage dtype

    scope: Scope
    ops: Any
    _blocks: dict[str, Callable]

    def block_names(self) -> list[str]:
        """Paths of the blocks that run in isolation, in execution order ("" is not included)."""
        return [path for path in self._blocks if path]

    def module(self, path: str) -> Callable:
        try:
            return self._blocks[path]
        except KeyError:
            raise ModelInputError(f"{self.name} has no block {path!r}; blocks: "
                                  f"{', '.join(repr(p) for p in self._blocks)}") from None

    def block(self, path: str) -> Callable:
        """Block `path` as a function of its captured inputs: `block(path)(**inputs, taps=None)`."""
        self.module(path)

        def call(taps: Taps | None = None, **inputs):
            return self.run_block(path, inputs, taps)

        call.__name__ = call.__qualname__ = f"{self.name}:{path or '<root>'}"
        return call

    def convert_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Captured inputs (NumPy arrays, tensors, tuples of them) as backend arrays."""
        def convert(name, value):
            if isinstance(value, (tuple, list)):
                return tuple(convert(name, v) for v in value)
            if isinstance(value, dict):
                return {key: convert(name, v) for key, v in value.items()}
            if value is None or isinstance(value, (str, bool)):
                return value
            if name in self._float32_inputs:
                return self.ops.asarray(value, "fp32")
            return self.ops.asarray(value)

        return {name: convert(name, value) for name, value in unflatten_inputs(inputs).items()}

    def run_block(self, path: str, inputs: dict[str, Any], taps: Taps | None = None):
        """Run block `path` ("" = the whole component) on `inputs` named like the reference's captured
        `path@argument` tensors; returns the output in the reference's structure."""
        fn = self.module(path)
        args = self.convert_inputs(inputs)
        try:
            inspect.signature(fn).bind(**args)
        except TypeError as exc:
            raise ModelInputError(f"{self.name} block {path!r} cannot take inputs {sorted(args)}: {exc}") from None
        with self.scope.bind(taps), self.ops.inference():
            return fn(**args)


__all__ = ["Activation", "Component", "Conv2d", "Dropout", "GroupNorm", "LayerNorm", "Linear", "Scope", "Taps",
           "unflatten_inputs"]
