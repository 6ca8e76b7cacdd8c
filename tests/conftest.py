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
