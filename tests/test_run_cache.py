"""The run cache stays within its size limit, evicting the least recently used runs, never one in use."""
import os

import pytest

from sd_parity.errors import BadInput
from sd_parity.runs.cache import IN_USE_SECONDS, LIMIT_ENV, cache_limit, evict


def _run(folder, name, size, used):
    path = folder / name
    path.write_bytes(b"\0" * size)
    os.utime(path, (used, used))
    return path


def test_least_recently_used_runs_go_first_until_the_cache_fits(tmp_path, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, str(2500 / 1e9))  # 2,500 bytes
    now = 1_000_000.0
    old = _run(tmp_path, "a.h5", 1000, now - 3 * IN_USE_SECONDS)
    older = _run(tmp_path, "b.h5", 1000, now - 4 * IN_USE_SECONDS)
    recent = _run(tmp_path, "c.h5", 1000, now - 2 * IN_USE_SECONDS)
    new = _run(tmp_path, "d.h5", 1000, now)
    assert evict(tmp_path, keep=new, now=now) == [older, old]
    assert sorted(p.name for p in tmp_path.iterdir()) == [recent.name, new.name]


def test_runs_in_use_are_kept_even_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, str(100 / 1e9))
    now = 1_000_000.0
    reference = _run(tmp_path, "reference.h5", 1000, now - IN_USE_SECONDS / 2)  # this case's reference
    oracle = _run(tmp_path, "oracle.h5", 1000, now)
    assert evict(tmp_path, keep=oracle, now=now) == []
    assert reference.exists() and oracle.exists()


@pytest.mark.parametrize("value", ["lots", "0", "-3"])
def test_a_bad_limit_is_bad_input(monkeypatch, value):
    monkeypatch.setenv(LIMIT_ENV, value)
    with pytest.raises(BadInput, match=LIMIT_ENV):
        cache_limit()
