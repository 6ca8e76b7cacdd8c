"""The clean sweep: correct code never raises a false alarm (`make test-all`; slow).

20 seeds x fp32/fp16/bf16 x both impl backends x DDIM/PNDM/Euler ancestral on tiny-sd1 (2 steps), each case
calibrated (fp64 oracle for the free run, block-local oracle for the isolated run) and judged as
`parity run` judges it: every case must come out at parity, with no culprit. The worst ratio to
threshold over all compared tensors is the margin recorded in docs/tolerances.md; the sweep writes it,
per dtype and comparison, to reports/clean-sweep.json, beside the same tensors judged by the default
thresholds (no oracle) and the largest relative L2 error of a tensor judged on its own: the evidence
for the default budgets. Its ~1,000 run files go to a run cache of its
own, emptied whenever the seed or sampler changes (they would fill tens of GB otherwise).
"""
import itertools
import json
import os
import shutil
from pathlib import Path

import pytest

from sd_parity.cases.case import Case, judge_case
from sd_parity.judging.tolerances import Tolerances, judge
from sd_parity.runs.config import RunConfig

# SD_PARITY_SWEEP_SEEDS=N runs the first N seeds only (a quicker look; docs say how many were measured)
SEEDS = range(int(os.environ.get("SD_PARITY_SWEEP_SEEDS", "20")))
DTYPES = ("fp32", "fp16", "bf16")
BACKENDS = ("numpy", "torch")
SCHEDULERS = ("ddim", "pndm", "euler_ancestral")
REPORT = Path(__file__).resolve().parent.parent / "reports" / "clean-sweep.json"


@pytest.fixture(scope="module")
def margins():
    worst: dict[str, list] = {}
    yield worst
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(worst, indent=2) + "\n")
    print("\nclean sweep, worst ratio to threshold:", json.dumps(worst))


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep-runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SD_PARITY_RUN_CACHE", str(folder))
        yield {"folder": folder, "group": None}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def group_cache(request, run_cache):
    """The runs of one (seed, sampler) group are shared by its dtypes and backends, then dropped."""
    params = request.node.callspec.params
    group = (params["seed"], params["scheduler"])
    if run_cache["group"] != group:
        shutil.rmtree(run_cache["folder"], ignore_errors=True)
        run_cache["folder"].mkdir(parents=True, exist_ok=True)
        run_cache["group"] = group


def _worst(comparison):
    rows = [r for r in comparison.results if r.ratio is not None]
    row = max(rows, key=lambda r: r.ratio)
    return row.ratio, row.key


def _uncalibrated(comparison):
    """(worst ratio, key) of the same tensors judged by the default thresholds, and (largest relative L2
    error, key) of those judged on their own (not derived)."""
    defaults, worst, largest = Tolerances(), (0.0, ""), (0.0, "")
    for row in comparison.results:
        if row.decision is None:
            continue
        if row.decision.mode in ("calibrated", "normwise"):
            ratio = judge(row.metrics, defaults.rule_for(row.component, row.invocation, row.name,
                                                         row.decision.settings["dtype"])).ratio
            largest = max(largest, (row.metrics.rel_l2, row.key))
        else:
            ratio = row.ratio
        worst = max(worst, (ratio, row.key))
    return worst, largest


def _note(margins, label, value, where):
    if value > margins.get(label, [0.0])[0]:
        margins[label] = [value, where]


@pytest.mark.slow
@pytest.mark.parametrize("seed, scheduler, dtype, backend", list(itertools.product(SEEDS, SCHEDULERS, DTYPES, BACKENDS)))
def test_clean_case_is_at_parity(seed, scheduler, dtype, backend, margins, group_cache):
    config = RunConfig(model="tiny-sd1", steps=2, scheduler=scheduler, dtype=dtype, seed=seed,
                       prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry")
    judged = judge_case(Case(config, backend))
    for run in ("candidate", "isolated"):  # used by this case alone
        judged.runs[run].unlink()
    assert judged.verdict.status == "parity", judged.verdict.text
    assert judged.verdict.culprits == []
    case = f"{backend} {scheduler} seed {seed}"
    for label, comparison in (("free", judged.comparison), ("isolated", judged.isolated)):
        ratio, key = _worst(comparison)
        _note(margins, f"{dtype} {label}", ratio, f"{case}: {key}")
        (ratio, key), (rel_l2, where) = _uncalibrated(comparison)
        _note(margins, f"{dtype} {label} default thresholds", ratio, f"{case}: {key}")
        _note(margins, f"{dtype} {label} largest rel_l2", rel_l2, f"{case}: {where}")
