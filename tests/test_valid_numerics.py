"""No false alarm on valid numerics: a correct port that orders its arithmetic differently passes.

The test double (tests/reordered_port.py) is impl's torch backend with a hand-written softmax, a
pow-based time embedding, unfused projections and one norm accumulated in float64. It must have no
failing tensor and no culprit, judged without an oracle (the default thresholds) and calibrated, on
tiny-sd1 and (slow) on the full SD 1.5 architecture.
"""
from pathlib import Path

import pytest

from sd_parity.cases.case import Case, judge_case
from sd_parity.judging.compare import compare_runs
from sd_parity.judging.verdict import make_verdict
from sd_parity.runs.config import RunConfig

PORT = f"{Path(__file__).resolve().parent / 'reordered_port.py'}:reordered_port"


def _assert_clean(comparison, isolated):
    for label, result in (("free", comparison), ("isolated", isolated)):
        failing = [(r.key, r.decision.reason if r.decision else r.status) for r in result.results if r.divergent]
        assert failing == [], f"{label}: {failing[:5]}"
    verdict = make_verdict(comparison, isolated)
    assert verdict.status == "parity" and verdict.culprits == [] and not verdict.identical, verdict.text


def _check(config: RunConfig):
    judged = judge_case(Case(config, PORT))
    _assert_clean(judged.comparison, judged.isolated)  # calibrated
    runs = judged.runs
    _assert_clean(compare_runs(runs["reference"], runs["candidate"]),  # default thresholds, no oracle
                  compare_runs(runs["reference"], runs["isolated"]))


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral"])
def test_a_reordered_port_has_no_failing_tensor_and_no_culprit(scheduler):
    _check(RunConfig(model="tiny-sd1", steps=3, scheduler=scheduler, negative_prompt="blurry"))


@pytest.mark.slow
def test_a_reordered_port_at_full_size():
    _check(RunConfig(model="sd15-arch", steps=2, height=256, width=256))
