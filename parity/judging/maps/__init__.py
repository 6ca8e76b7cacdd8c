"""Built-in name maps (`parity compare --map ldm`): generated tables, not files of rules.

A built-in map is a Table: for each component, exact candidate names, module-path prefixes renamed
wholesale, and the reference tensors the candidate's naming has no counterpart for. Tables are
generated when a comparison starts, from the model's config (the reference run names its model
folder; `--model-dir` overrides), so they fit every configuration of the architecture.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sd_parity.runs.naming import module_path
from ..name_map import NameMapError, Target, split_key

BUILTINS = {"ldm": "the original CompVis/LDM module names (docs/maps.md)"}


def builtin_names() -> list[str]:
    return sorted(BUILTINS)


@dataclass
class Table:
    name: str
    exact: dict[tuple[str, str], Target] = field(default_factory=dict)  # (component, candidate name) -> names
    prefixes: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> {cand module: ref module}
    strip: dict[str, str] = field(default_factory=dict)  # component -> a leading prefix candidate names may carry
    absent: dict[tuple[str, str], str] = field(default_factory=dict)  # (component, reference name) -> why

    def lookup(self, key: str) -> Target | None:
        """The target of candidate key `key`, with full reference keys, or None when the table has no entry."""
        component, invocation, name = split_key(key)
        name = name.removeprefix(self.strip.get(component, ""))
        target = self.exact.get((component, name)) or self._by_prefix(component, name)
        if target is None:
            return None
        full = lambda ref: f"{component}/{invocation}/{ref}"  # noqa: E731
        return Target(full(target.to) if target.to is not None else None, tuple(full(a) for a in target.also),
                      drop=target.drop, transform=target.transform, via=f"built-in map {self.name}")

    def absent_reason(self, ref_key: str) -> str | None:
        component, _, name = split_key(ref_key)
        reason = self.absent.get((component, name))
        return f"{reason} (built-in map {self.name})" if reason else None

    def _by_prefix(self, component: str, name: str) -> Target | None:
        prefixes = self.prefixes.get(component)
        if not prefixes:
            return None
        parts = module_path(name).split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in prefixes:
                rest = name[len(prefix):]
                mapped = prefixes[prefix]
                if not mapped:  # the whole prefix goes: only a sub-module keeps a name
                    if not rest.startswith("."):
                        return None
                    rest = rest[1:]
                return Target(mapped + rest)
        return None


def build_table(name: str, ref_metadata: dict, model_dir: Path | None) -> Table:
    if name == "ldm":
        from .ldm import ldm_table

        return ldm_table(model_configs(ref_metadata, model_dir))
    raise NameMapError(f"unknown built-in map {name!r}; use one of {', '.join(builtin_names())}")


def model_configs(ref_metadata: dict, model_dir: Path | None) -> dict[str, dict]:
    """The unet/vae/text_encoder config.json of the reference's model folder."""
    folder = _model_folder(ref_metadata, model_dir)
    configs = {}
    for component in ("unet", "vae", "text_encoder"):
        path = folder / component / "config.json"
        try:
            configs[component] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise NameMapError(f"built-in name maps are generated from the model's configs, and {path} cannot be "
                               f"read ({exc}); pass --model-dir with the diffusers model folder") from exc
    return configs


def _model_folder(ref_metadata: dict, model_dir: Path | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    recorded = ref_metadata.get("model_path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    model = ref_metadata.get("model")
    if isinstance(model, str) and re.fullmatch(r"[\w.-]+", model):
        from sd_parity.fixtures import FIXTURES, fixture_path

        if model in FIXTURES and fixture_path(model).is_dir():
            return fixture_path(model)
    raise NameMapError("built-in name maps are generated from the model's configs, but the reference run's model "
                       f"folder ({recorded or 'not recorded'}) is not here; pass --model-dir with the diffusers "
                       "model folder")
