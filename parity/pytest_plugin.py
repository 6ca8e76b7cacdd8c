"""The pytest plugin of sd-parity (entry point pytest11 `sd_parity`), for a port's own test suite.

    import sd_parity

    def test_unet_down_block_1(parity_reference):
        ref = parity_reference("tiny-sd1", steps=2, capture="blocks")       # cached reference run
        cand = sd_parity.run_candidate("my_port.parity:make", ref, mode="isolated")
        sd_parity.assert_parity(ref, cand, only="unet_block_1_down")

Fixtures: `parity_reference` (a factory of cached reference runs: model, then RunConfig fields) and
`parity_report_dir` (this test's report folder). A failing assert_parity writes its HTML report
into the test's folder under `--parity-reports DIR` (default: pytest's temporary folder) and names it.
Baselines: `--parity-write-baseline DIR` keeps each check's summary.json under DIR; a later run with
`--parity-baseline DIR` fails a check only for what got worse since (sd_parity.judging.baseline).
Importing this module costs nothing: sd-parity itself is imported when a fixture is used.
"""
from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser) -> None:
    group = parser.getgroup("sd-parity")
    group.addoption("--parity-reports", metavar="DIR", default=None, type=Path,
                    help="where sd_parity.assert_parity writes the reports of failing checks, one folder per "
                         "test (default: parity-reports/ under pytest's temporary folder)")
    group.addoption("--parity-baseline", metavar="DIR", default=None, type=Path,
                    help="judge each assert_parity against the summary.json a previous run wrote for the same test "
                         "under DIR (--parity-write-baseline): only what got worse since then fails")
    group.addoption("--parity-write-baseline", metavar="DIR", default=None, type=Path,
                    help="write each assert_parity's summary.json under DIR, one folder per test: the baseline of "
                         "later runs (--parity-baseline DIR)")


@pytest.fixture(scope="session")
def parity_reference():
    """Factory: parity_reference(model="tiny-sd1", calibrated=True, **RunConfig fields) -> the reference
    run (an os.PathLike with .config, .oracle and .replay()), captured once and cached on disk."""
    from sd_parity.testing import reference_run

    return reference_run


@pytest.fixture
def parity_report_dir(request, tmp_path_factory) -> Path:
    """This test's report folder (created on first use)."""
    return _report_dir(request, tmp_path_factory)


@pytest.fixture(autouse=True)
def _parity_report_folder(request, tmp_path_factory):
    from sd_parity.testing import Baselines, baselines, report_folder

    read, write = (request.config.getoption(option) for option in ("parity_baseline", "parity_write_baseline"))
    where = Baselines(read=(lambda: _test_folder(read, request)) if read is not None else None,
                      write=(lambda: _test_folder(write, request, create=True)) if write is not None else None)
    with report_folder(lambda: _report_dir(request, tmp_path_factory)), baselines(where):
        yield


def _report_dir(request, tmp_path_factory) -> Path:
    root = request.config.getoption("parity_reports") or tmp_path_factory.getbasetemp() / "parity-reports"
    return _test_folder(Path(root), request, create=True)


def _test_folder(root: Path, request, create: bool = False) -> Path:
    """This test's folder under `root` (reports, baselines)."""
    from sd_parity.testing import safe_name

    folder = Path(root) / safe_name(request.node.nodeid)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder
