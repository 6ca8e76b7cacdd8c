"""Tensor names in a run file, and the blocks they belong to.

A module output is named by its module path (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`).
Structured values are flattened: element i of a tuple is `name[i]`, field k of a dict-like output
`name[k]` (a component's own outputs have an empty module path, so they are just `k`).
The second and later calls of one module within one invocation get `#1`, `#2`, ... .
A block's inputs are `block@argument` (positional arguments as `block@0`), flattened the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

from sd_parity.impl.families import COMPONENTS, block_test_id

_SUFFIX = re.compile(r"(\[.*|@.*|#\d+)$")


def glob_to_regex(pattern: str) -> str:
    """This project's one glob dialect (name maps, tolerance overrides, `--capture glob:`, `--only`):
    `**` any run of characters, `*` any run without '/', `?` one character other than '/'.

    Everything else is literal, including `[ ]`, which tensor names use for flattened outputs.
    Each wildcard becomes a capture group, numbered left to right.
    """
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif pattern[i] == "*":
            out.append("([^/]*)")
            i += 1
        elif pattern[i] == "?":
            out.append("([^/])")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def join(name: str, key: str | int) -> str:
    return str(key) if name == "" else f"{name}[{key}]"


def flatten(name: str, value: Any, is_tensor) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) for every tensor inside `value`, in a stable order."""
    if is_tensor(value):
        yield name, value
    elif isinstance(value, dict) or hasattr(value, "items") and hasattr(value, "keys"):
        for key, item in value.items():
            yield from flatten(join(name, key), item, is_tensor)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from flatten(join(name, index), item, is_tensor)


def with_call_index(name: str, index: int) -> str:
    return name if index == 0 else f"{name}#{index}"


def module_path(name: str) -> str:
    """The module a tensor name belongs to: the name without flattening, call or input suffixes."""
    return _SUFFIX.sub("", name.split("@", 1)[0].split("[", 1)[0].split("#", 1)[0])


@dataclass(frozen=True)
class Block:
    """A unit that parity can run in isolation: a transformer layer, a UNet or VAE block."""

    component: str
    path: str  # module path, e.g. "down_blocks.3"

    @property
    def test_id(self) -> str:
        """The pytest id stem: unet_block_3_down, unet_block_mid, clip_block_0, vae_decoder_block_1_up."""
        match = _BLOCK_RE[self.component].match(self.path)
        assert match is not None
        return block_test_id(COMPONENTS[self.component], match)


# Module paths of the blocks of each component, and the prefix under which its top-level modules sit
# (the model-family registry, sd_parity.impl.families, holds both).
_BLOCK_RE = {name: re.compile(c.blocks) for name, c in COMPONENTS.items()}
_TOP_LEVEL_PREFIX = {name: c.top_prefix for name, c in COMPONENTS.items()}


def is_block(component: str, path: str) -> bool:
    """Whether the module at `path` is one of the component's blocks (the units of isolated runs)."""
    pattern = _BLOCK_RE.get(component)
    return pattern is not None and pattern.match(path) is not None


def block_of(component: str, name: str) -> Block | None:
    """The block whose subtree holds tensor `name`, or None for tensors outside any block."""
    pattern = _BLOCK_RE.get(component)
    if pattern is None:
        return None
    parts = module_path(name).split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if pattern.match(prefix):
            return Block(component, prefix)
    return None


def is_block_level(component: str, name: str) -> bool:
    """True for a block's own outputs and inputs, a component's top-level modules and its outputs.

    This is the default capture for full-size models: enough to locate a divergence to a block and to
    re-run any block alone, at a few percent of the all-tensor volume.
    """
    if component == "pipeline":
        return True
    path = module_path(name)
    if path == "" or _BLOCK_RE[component].match(path):
        return True
    prefix = _TOP_LEVEL_PREFIX[component]
    if prefix and path == prefix[:-1]:
        return True
    rest = path[len(prefix):] if path.startswith(prefix) else path
    return "." not in rest


def blocks_in(component: str, names) -> list[Block]:
    """Distinct blocks of `component` among tensor names, in first-seen order."""
    seen: dict[str, Block] = {}
    for name in names:
        block = block_of(component, name)
        if block is not None and block.path == module_path(name):
            seen.setdefault(block.path, block)
    return list(seen.values())
