"""Shared test setup: offline by construction, fixtures generated locally, reference runs cached by content."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from sd_parity import threads  # noqa: E402
from sd_parity.fixtures import ensure_fixture  # noqa: E402
from sd_parity.runs.config import RunConfig  # noqa: E402
from sd_parity.runs.cache import cached_run  # noqa: E402

threads.apply()  # the tool's thread policy: one count for torch, BLAS and impl's pools (it decides reduction order)


@pytest.fixture(scope="session")
def tiny_model():
    return ensure_fixture("tiny-sd1")


@pytest.fixture(scope="session")
def reference_run():
    """Factory: the cached reference run file for RunConfig(**fields) on tiny-sd1."""
    from sd_parity.reference.runner import run_reference

    def get(**fields):
        config = RunConfig(**{"model": "tiny-sd1", **fields})
        return cached_run(config, "reference", lambda cfg, path: run_reference(cfg, path, progress=False))

    return get


@pytest.fixture(scope="session")
def impl_run():
    """Factory: the cached impl run file for (backend, RunConfig fields), replaying the reference's noise."""
    from sd_parity.candidates.impl import ImplCandidate
    from sd_parity.candidates.runner import run_free, run_isolated
    from sd_parity.reference.runner import run_reference

    def get(backend, isolated=False, **fields):
        config = RunConfig(**{"model": "tiny-sd1", **fields})
        reference = cached_run(config, "reference", lambda cfg, path: run_reference(cfg, path, progress=False))
        candidate = ImplCandidate(backend)
        if isolated:
            produce = lambda cfg, path: run_isolated(candidate, cfg, reference, path)  # noqa: E731
        else:
            produce = lambda cfg, path: run_free(candidate, cfg, path, reference=reference)  # noqa: E731
        return reference, cached_run(config, backend, produce, mode="isolated" if isolated else "free",
                                     fingerprint=candidate.fingerprint())

    return get
