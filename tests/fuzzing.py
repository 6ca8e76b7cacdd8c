"""Hypothesis budgets for the fuzz tests (tests/test_fuzz_*.py): `make test` runs a short, derandomized
budget (the same examples every run, seconds); `make test-all` sets SD_PARITY_FUZZ=long for a longer,
random one. docs/errors.md lists what is fuzzed."""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("short", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("SD_PARITY_FUZZ", "short"))
