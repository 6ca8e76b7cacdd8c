"""What a capture keeps: the `--capture SPEC` grammar.

SPEC is a list of terms separated by ';':
    all                       every tensor (the default for small models)
    blocks                    block-level tensors only: block outputs and inputs, top-level modules
                              (the default for full-size models)
    pipeline                  pipeline-level tensors only
    text_encoder | text_encoder_2 | unet | vae_encoder | vae_decoder
                              restrict module capture to these components (those of the
                              model's family; sd_parity.impl.families)
    glob:PATTERN              module tensors whose name matches PATTERN (the glob dialect of
                              naming.glob_to_regex: `*`, `**`, `?`; `[ ]` are literal)
    re:REGEX                  module tensors whose name contains a match of REGEX
    steps=LIST                only these denoising steps (0-based; ranges a-b; negative counts from the end)
Name terms (all, blocks, glob, re) are a union; component and step terms restrict it.
Pipeline-level tensors (token ids, embeddings, per-step latents and noise predictions, the image)
are always kept: they are small, and comparison needs them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from sd_parity.errors import BadInput
from sd_parity.impl.families import COMPONENTS

from .naming import glob_to_regex, is_block_level

MODULE_COMPONENTS = tuple(COMPONENTS)


class CaptureSpecError(BadInput, ValueError):
    """A --capture SPEC that cannot be parsed."""


@dataclass
class CaptureSpec:
    text: str
    components: frozenset[str] = frozenset(MODULE_COMPONENTS)
    name_filters: list[Callable[[str, str], bool]] = field(default_factory=list)
    steps: tuple[int, ...] | None = None
    modules: bool = True  # False for `pipeline`: no module tensor is wanted
    _cache: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, text: str) -> "CaptureSpec":
        components: set[str] = set()
        filters: list[Callable[[str, str], bool]] = []
        steps: list[int] | None = None
        module_capture = True
        for term in (t.strip() for t in text.split(";")):
            if not term:
                continue
            if term == "all":
                filters.append(lambda component, name: True)
            elif term == "blocks":
                filters.append(is_block_level)
            elif term == "pipeline":
                module_capture = False
            elif term in MODULE_COMPONENTS:
                components.add(term)
            elif term.startswith("glob:") and term[5:]:
                pattern = re.compile(glob_to_regex(term[5:]))
                filters.append(lambda component, name, p=pattern: p.fullmatch(name) is not None)
            elif term.startswith("re:") and term[3:]:
                try:
                    regex = re.compile(term[3:])
                except re.error as exc:
                    raise CaptureSpecError(f"bad regular expression in capture term {term!r}: {exc}") from exc
                filters.append(lambda component, name, r=regex: r.search(name) is not None)
            elif term.startswith("steps="):
                steps = (steps or []) + _parse_steps(term[6:])
            else:
                raise CaptureSpecError(
                    f"unknown capture term {term!r}; use all, blocks, pipeline, a component "
                    f"({', '.join(MODULE_COMPONENTS)}), glob:PATTERN, re:REGEX or steps=LIST, separated by ';'")
        if not module_capture:
            filters = [lambda component, name: False]
        elif not filters:
            filters = [lambda component, name: True]
        return cls(text=text, components=frozenset(components or MODULE_COMPONENTS),
                   name_filters=filters, steps=tuple(steps) if steps is not None else None, modules=module_capture)

    def wants(self, component: str, name: str) -> bool:
        """Whether a module tensor is kept (pipeline-level tensors always are)."""
        if component == "pipeline":
            return True
        key = (component, name)
        hit = self._cache.get(key)
        if hit is None:
            hit = component in self.components and any(f(component, name) for f in self.name_filters)
            self._cache[key] = hit
        return hit

    def wants_component(self, component: str) -> bool:
        return component == "pipeline" or component in self.components

    def wants_step(self, step: int, total: int) -> bool:
        if self.steps is None:
            return True
        return any(s == step or (s < 0 and total + s == step) for s in self.steps)

    def check_steps(self, total: int) -> None:
        """Refuse a steps= term that selects none of a run's `total` denoising steps."""
        if self.steps is not None and not any(self.wants_step(step, total) for step in range(total)):
            raise CaptureSpecError(f"capture {self.text!r}: steps={','.join(map(str, self.steps))} selects none of "
                                   f"the run's {total} steps (0..{total - 1}, or -1 for the last)")

    def check_selected(self, offered: int, kept: int, example: str | None) -> None:
        """Refuse a selection that kept none of the `offered` module tensors (unless `pipeline` asked for that)."""
        if self.modules and offered and not kept:
            raise CaptureSpecError(f"capture {self.text!r} selected none of the {offered} module tensors the run "
                                   f"produced (one was {example!r}); `parity inspect --tensors` of a run captured "
                                   "with --capture all lists the names to match")


def _parse_steps(text: str) -> list[int]:
    steps: list[int] = []
    for part in filter(None, text.split(",")):
        try:
            if re.fullmatch(r"\d+-\d+", part):
                low, high = map(int, part.split("-"))
                if high < low:
                    raise ValueError
                steps.extend(range(low, high + 1))
            else:
                steps.append(int(part))
        except ValueError:
            raise CaptureSpecError(f"bad step list {text!r}: use numbers, ranges a-b and negatives, "
                                   "separated by commas, e.g. steps=0,2-4,-1") from None
    if not steps:
        raise CaptureSpecError("steps= needs at least one step, e.g. steps=0,-1")
    return steps


def default_spec(parameter_count: int) -> str:
    """Full-size models default to block-level capture; all-tensor capture of SD 1.5 is ~220 GB per run."""
    return "blocks" if parameter_count > 200_000_000 else "all"
