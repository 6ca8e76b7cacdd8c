"""Run files cached on disk by content, so tests and suites capture each reference run once.

The key covers everything that can change the tensors: the run's config, the model folder's content
hash, the library versions, what decides reduction order (thread count, BLAS kernels) and a
fingerprint of the code that produces the run (for the reference: our capture code and the reference
package; for a candidate: what its `fingerprint()` returns, and a candidate without one is never cached).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Callable

from sd_parity.paths import exclusive, run_cache_dir
from sd_parity.threads import reduction_order

from .config import RunConfig, library_versions

# The packages (and modules) whose source decides what a captured run holds.
CAPTURE_PACKAGES = ("sd_parity.runs", "sd_parity.fixtures", "sd_parity.reference", "sd_parity.candidates.hooks",
                    "sd_parity.candidates.sinks")


@lru_cache(maxsize=None)
def source_fingerprint(*packages: str) -> str:
    """sha256 over the Python source of `packages` (names and bytes, in a stable order)."""
    digest = hashlib.sha256()
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None:
            continue
        folders = list(spec.submodule_search_locations or [])
        files = sorted(f for folder in folders for f in Path(folder).rglob("*.py")) if folders else [Path(spec.origin)]
        for file in files:
            digest.update(f"{package}:{file.name}".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_key(config: RunConfig, producer: str, fingerprint: str, mode: str = "free") -> str:
    from sd_parity.fixtures import folder_hash

    payload = {"config": asdict(config), "producer": producer, "mode": mode, "model": folder_hash(config.model_dir()),
               "versions": library_versions(), "numerics": reduction_order(),
               "source": source_fingerprint(*CAPTURE_PACKAGES),
               "producer_source": fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_run(config: RunConfig, producer: str, produce: Callable[[RunConfig, Path], Path], mode: str = "free",
               fingerprint: str | None = "") -> Path:
    """The run file for (config, producer, mode), produced by `produce(config, path)` on a cache miss.

    `fingerprint` identifies the producer's code; None means it cannot be identified, so the run is
    produced afresh into the cache folder every time."""
    folder = run_cache_dir()
    if fingerprint is None:
        path = folder / "uncached" / f"{producer}-{mode}-{config.dtype}-{cache_key(config, producer, '', mode)}.h5"
        with exclusive(_lock(path)):
            return produce(config, path) or path
    path = folder / f"{producer}-{mode}-{config.dtype}-{cache_key(config, producer, fingerprint, mode)}.h5"
    if not path.exists():
        with exclusive(_lock(path)):  # concurrent cases sharing this run (parity run --jobs, Ray) make it once
            if not path.exists():
                produce(config, path)
    return path


def _lock(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")
