"""Run files cached on disk by content, so tests and suites capture each reference run once.

The key covers everything that can change the tensors: the run's config, the model folder's content
hash, the library versions, what decides reduction order (thread count, BLAS kernels) and a
fingerprint of the code that produces the run (for the reference: our capture code and the reference
package; for a candidate: what its `fingerprint()` returns, and a candidate without one is never cached). The cache holds at most SD_PARITY_RUN_CACHE_GB gigabytes
(default 20); the least recently used runs go first.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Callable

from sd_parity.errors import BadInput
from sd_parity.paths import exclusive, run_cache_dir
from sd_parity.threads import reduction_order

from .config import RunConfig, library_versions

LIMIT_ENV = "SD_PARITY_RUN_CACHE_GB"
DEFAULT_LIMIT_GB = 20.0
IN_USE_SECONDS = 600

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
            produce(config, path)
    else:
        path = folder / f"{producer}-{mode}-{config.dtype}-{cache_key(config, producer, fingerprint, mode)}.h5"
        if path.exists():
            os.utime(path)  # recently used: the last to be evicted
            return path
        with exclusive(_lock(path)):  # concurrent cases sharing this run (parity run --jobs, Ray) make it once
            if not path.exists():
                produce(config, path)
    evict(folder, keep=path)
    return path


def cache_limit() -> int:
    """Bytes the run cache may hold: $SD_PARITY_RUN_CACHE_GB gigabytes (default 20)."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    try:
        gigabytes = float(text) if text else DEFAULT_LIMIT_GB
    except ValueError:
        raise BadInput(f"{LIMIT_ENV}={text!r} is not a number of gigabytes") from None
    if not gigabytes > 0:
        raise BadInput(f"{LIMIT_ENV}={text!r} must be a positive number of gigabytes")
    return int(gigabytes * 1e9)


def evict(folder: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Delete the least recently used run files until the cache fits its limit.

    Every key changes with the code, so without this a cache grows by every version it has seen. Runs
    used in the last IN_USE_SECONDS are kept (a case's reference must outlive the making of its oracle),
    so the cache may exceed its limit while a large case runs; a run another process has open stays
    readable after its deletion (POSIX unlink)."""
    now = time.time() if now is None else now
    files = []
    for path in folder.rglob("*.h5"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total, limit, removed = sum(size for _, size, _ in files), cache_limit(), []
    for used, size, path in sorted(files):  # oldest use first
        if total <= limit:
            break
        if path == keep or now - used < IN_USE_SECONDS:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


def _lock(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")
