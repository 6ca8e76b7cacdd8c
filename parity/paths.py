"""Where sd-parity finds what it ships and puts what it generates.

Shipped with the package (read-only): the CLIP BPE vocabulary, prompts, the committed x_T files and
images (`sd_parity.fixtures`), and the report's templates and scripts. Generated (never into
site-packages or the user's current folder): fixture models, x_T files for other models and sizes,
the run cache and the folder-hash memo, under a per-user cache folder. docs/configuration.md lists
the variables below.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CACHE_ENV = "SD_PARITY_CACHE_DIR"  # root of everything generated
MODELS_ENV = "SD_PARITY_MODELS_DIR"  # generated fixture models (several GB for the full-size ones)
RUNS_ENV = "SD_PARITY_RUN_CACHE"  # cached run files


def cache_dir() -> Path:
    """The root of everything sd-parity generates: $SD_PARITY_CACHE_DIR, else the platform's user cache."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sd-parity", appauthor=False))


def models_dir() -> Path:
    configured = os.environ.get(MODELS_ENV)
    return Path(configured).expanduser() if configured else cache_dir() / "models"


def run_cache_dir() -> Path:
    configured = os.environ.get(RUNS_ENV)
    return Path(configured).expanduser() if configured else cache_dir() / "runs"


def noise_dir() -> Path:
    """x_T files drawn for models and sizes that the package does not ship."""
    return cache_dir() / "noise"


def package_data(*parts: str) -> Path:
    """A file shipped inside the package (parts relative to the sd_parity package folder)."""
    return Path(__file__).resolve().parent.joinpath(*parts)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created empty if missing) for the block.

    Several processes share the caches: `parity run --jobs N`'s case workers, and Ray tasks whose run
    cache is on a shared folder. Each producer of a cached file takes the file's lock and looks again,
    so a file is produced once and the others wait for it. flock is released when its process dies (no
    stale locks), and Linux emulates it over NFS with POSIX locks, which work across machines. Where
    there is no fcntl (Windows) nothing is locked: files are still moved into place atomically, so at
    worst the work is done twice."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
