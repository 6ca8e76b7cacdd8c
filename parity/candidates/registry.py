"""`--candidate SPEC` to a candidate object.

SPEC is one of:
    numpy | torch                 impl/'s backends (built in)
    NAME                          a candidate registered by an installed package under the entry-point
                                  group `sd_parity.candidates` (NAME = factory, as in pyproject.toml:
                                  [project.entry-points."sd_parity.candidates"] my-port = "my_port.parity:make")
    pkg.module:factory            a factory (or class) importable from the environment or the current folder
    path/to/port.py:factory       a factory in a Python file (imported under a private module name, with
                                  the file's folder on sys.path, as `python path/to/port.py` would have it)
    cmd:{"block": ..., "run": ...}:NAME   a program in any language, driven through its command line
                                  (what `parity run --candidate-cmd` makes; see candidates/subprocess.py)
A factory is called without arguments and returns an object that follows sd_parity.Candidate.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from sd_parity.errors import BadInput, SdParityError
from sd_parity.runs.selection import CaptureSpec

ENTRY_POINT_GROUP = "sd_parity.candidates"
COMMAND_SPEC_PREFIX = "cmd:"


def _impl(backend: str) -> Callable[[], Any]:
    def make() -> Any:
        from .impl import ImplCandidate

        return ImplCandidate(backend)
    return make


BUILTIN: dict[str, Callable[[], Any]] = {"numpy": _impl("numpy"), "torch": _impl("torch")}


def builtin_names() -> tuple[str, ...]:
    return tuple(BUILTIN)


def registered() -> dict[str, Any]:
    """Entry points of installed ports, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def label(spec: str) -> str:
    """A short, file-name-safe name for a candidate spec: NAME for built-in and registered candidates,
    STEM.FACTORY for pkg.module:factory and path/to/port.py:factory, NAME for a command's cmd:...:NAME."""
    target, sep, factory = spec.rpartition(":")
    short = spec
    if spec.startswith(COMMAND_SPEC_PREFIX):
        short = factory
    elif sep and target and factory and spec not in BUILTIN:
        stem = Path(target).stem if target.endswith(".py") else target.rsplit(".", 1)[-1]
        short = f"{stem}.{factory}"
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in short)


def resolve(spec: str, fault: str | None = None) -> Any:
    """The candidate object for `spec` (see the module docstring); BadInput saying what to fix otherwise."""
    if fault is not None:
        if spec not in BUILTIN:
            raise BadInput(f"--inject-fault applies to impl's own backends ({', '.join(BUILTIN)}), not to {spec!r}")
        from .impl import ImplCandidate

        return ImplCandidate(spec, fault=fault)
    factory = _factory(spec)
    try:
        candidate = factory()
    except SdParityError:
        raise
    except Exception as exc:  # noqa: BLE001 - a port's own failure, reported as such
        raise BadInput(f"--candidate {spec}: its factory failed: {type(exc).__name__}: {exc}") from exc
    return checked(candidate, spec)


def checked(candidate: Any, spec: str) -> Any:
    """`candidate` if it follows the protocol (a name is given where it has none); BadInput otherwise."""
    if not callable(getattr(candidate, "capture", None)):
        raise BadInput(f"--candidate {spec}: {type(candidate).__name__} has no capture(run) method; "
                       "see docs/ports.md for the candidate protocol")
    tensors = getattr(candidate, "tensors", None)
    if tensors is not None:
        try:
            CaptureSpec.parse(tensors)
        except SdParityError as exc:
            raise BadInput(f"--candidate {spec}: its `tensors` is not a capture spec: {exc}") from exc
    if not getattr(candidate, "name", None) or getattr(candidate, "name", None) == "candidate":
        try:
            candidate.name = label(spec)
        except AttributeError:  # a read-only name: the candidate keeps its own
            pass
    return candidate


def _factory(spec: str) -> Callable[[], Any]:
    if spec.startswith(COMMAND_SPEC_PREFIX):  # a foreign program (parity run --candidate-cmd)
        from .subprocess import CommandCandidate

        return lambda: CommandCandidate.from_spec(spec)
    if spec in BUILTIN:
        return BUILTIN[spec]
    points = registered()
    if spec in points:
        try:
            return points[spec].load()
        except Exception as exc:  # noqa: BLE001
            raise BadInput(f"--candidate {spec}: the entry point {points[spec].value} failed to load: {exc}") from exc
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        known = ", ".join([*BUILTIN, *points]) or "none"
        raise BadInput(f"--candidate {spec!r}: not a known candidate ({known}); give pkg.module:factory or "
                       "path/to/port.py:factory")
    module = _load_file(Path(target), spec) if target.endswith(".py") else _import(target, spec)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise BadInput(f"--candidate {spec}: {target} has no callable {attribute!r}")
    return factory


def _import(name: str, spec: str):
    folder = str(Path.cwd())
    if folder not in sys.path:  # a port's own checkout, as `python -m` would see it; installed packages win
        sys.path.append(folder)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BadInput(f"--candidate {spec}: cannot import {name}: {exc}") from exc


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise BadInput(f"--candidate {spec}: {path} does not exist")
    path = path.resolve()
    name = f"_sd_parity_candidate_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the port's file failed to import
        del sys.modules[name]
        raise BadInput(f"--candidate {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module
