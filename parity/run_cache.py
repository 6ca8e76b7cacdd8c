"""Run files cached on disk by content, so tests and suites capture each reference run once.

The key covers everything that can change the tensors: the run's config, the model folder's content
hash, the library versions and the source of the code that captures.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .runconfig import RunConfig, library_versions

CACHE_DIR = Path(os.environ.get("SD_PARITY_CACHE", Path(__file__).resolve().parent.parent / "build" / "run-cache"))
_CAPTURE_SOURCES = ("parity/recorder.py", "parity/naming.py", "parity/runfile.py", "parity/capture_spec.py",
                    "parity/fixtures.py", "reference", "impl", "parity/impl_runner.py", "parity/faults.py")


def _source_hash() -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for entry in _CAPTURE_SOURCES:
        path = root / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
        for file in files:
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_key(config: RunConfig, impl: str, mode: str = "free") -> str:
    from .fixtures import folder_hash

    fields = asdict(config)
    payload = {"config": fields, "impl": impl, "mode": mode, "model": folder_hash(config.model_dir()),
               "versions": library_versions(), "source": _source_hash()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_run(config: RunConfig, impl: str, produce: Callable[[RunConfig, Path], Path], mode: str = "free") -> Path:
    """The run file for (config, impl, mode), produced by `produce(config, path)` on a cache miss."""
    path = CACHE_DIR / f"{impl}-{mode}-{config.dtype}-{cache_key(config, impl, mode)}.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        produce(config, path)
    return path
