"""Shared test setup: offline by construction, fixtures generated locally, reference runs cached by content."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from parity.fixtures import ensure_fixture  # noqa: E402
from parity.runconfig import RunConfig  # noqa: E402
from parity.run_cache import cached_run  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    return ensure_fixture("tiny-sd1")


@pytest.fixture(scope="session")
def reference_run():
    """Factory: the cached reference run file for RunConfig(**fields) on tiny-sd1."""
    from reference.runner import run_reference

    def get(**fields):
        config = RunConfig(**{"model": "tiny-sd1", **fields})
        return cached_run(config, "reference", lambda cfg, path: run_reference(cfg, path, progress=False))

    return get


@pytest.fixture(scope="session")
def impl_run():
    """Factory: the cached impl run file for (backend, RunConfig fields), replaying the reference's noise."""
    from parity.impl_runner import run_impl, run_impl_isolated
    from reference.runner import run_reference

    def get(backend, isolated=False, **fields):
        config = RunConfig(**{"model": "tiny-sd1", **fields})
        reference = cached_run(config, "reference", lambda cfg, path: run_reference(cfg, path, progress=False))
        if isolated:
            produce = lambda cfg, path: run_impl_isolated(cfg, reference, path, backend)  # noqa: E731
        else:
            produce = lambda cfg, path: run_impl(cfg, path, backend, reference=reference)  # noqa: E731
        return reference, cached_run(config, backend, produce, mode="isolated" if isolated else "free")

    return get
