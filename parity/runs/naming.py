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
        stem = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae_decoder",
                "vae_encoder": "vae_encoder"}[self.component]
        match = _BLOCK_RE[self.component].match(self.path)
        assert match is not None
        if match.groupdict().get("mid"):
            return f"{stem}_block_mid"
        kind, index = match.group("kind"), match.group("index")
        if self.component == "text_encoder":
            return f"{stem}_block_{index}"
        direction = "down" if kind.startswith("down") else "up"
        return f"{stem}_block_{index}_{direction}"


# Module paths of the blocks of each component, and the prefix under which its top-level modules sit.
_BLOCK_RE = {
    "text_encoder": re.compile(r"^(?P<kind>encoder\.layers)\.(?P<index>\d+)$"),
    "unet": re.compile(r"^(?:(?P<kind>down_blocks|up_blocks)\.(?P<index>\d+)|(?P<mid>mid_block))$"),
    "vae_decoder": re.compile(r"^decoder\.(?:(?P<kind>up_blocks)\.(?P<index>\d+)|(?P<mid>mid_block))$"),
    "vae_encoder": re.compile(r"^encoder\.(?:(?P<kind>down_blocks)\.(?P<index>\d+)|(?P<mid>mid_block))$"),
}
_TOP_LEVEL_PREFIX = {"text_encoder": "", "unet": "", "vae_decoder": "decoder.", "vae_encoder": "encoder."}


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
