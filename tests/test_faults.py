"""The harness catches known porting bugs and names the faulted module; clean runs raise no alarm.

Each fault (sd_parity.candidates.faults) is injected into impl/ alone; the free-mode first divergence and the
isolated-mode culprit must both point at the faulted module (or, for a pipeline-stage bug, the stage's
tensor, named by the isolated run of that stage). The subtle faults (LayerNorm eps 1e-6 for 1e-5, a
Linear's bias off by 1e-4) are caught with a margin: the verdict's worst ratio is at least 2.
Clean runs over several seeds and every dtype must come out at parity.
`make test` runs every fault on the torch backend and one clean seed; `make test-all` adds the NumPy
backend's faults and a second seed, and tests/test_clean_sweep.py the 360-case clean sweep
(docs/faults.md and docs/tolerances.md have the results).
"""
import pytest

from sd_parity.candidates.faults import FAULTS
from sd_parity.cases.case import Case, judge_case
from sd_parity.fixtures import fixture_family
from sd_parity.runs.config import RunConfig

BASE = dict(model="tiny-sd1", steps=3, prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry")
# a family fault (SD 2.x, SDXL) runs on the tiny fixture of the first family it names, at 2 steps
TINY = {fixture_family(name).name: name for name in ("tiny-sd1", "tiny-sd2", "tiny-sdxl")}


def _fields(fault) -> dict:
    return {"model": TINY[fault.families[0]], "steps": 2} if fault.families else {}


def _judged(backend, fault=None, **fields):
    """The case judged as `parity run` judges it (calibrated, free and isolated), without the HTML report."""
    return judge_case(Case(RunConfig(**{**BASE, **fields}), backend, fault=fault))


@pytest.mark.parametrize("backend", ["torch", pytest.param("numpy", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_is_detected_and_localized(name, backend):
    fault = FAULTS[name]
    judged = _judged(backend, fault=name, **_fields(fault))
    verdict = judged.verdict
    assert verdict.status == "divergence", f"{name} went undetected: {verdict.text}"
    first = verdict.first_divergence
    assert fault.names(first.component, first.name), f"{name}: first divergence at {first.key}"
    culprits = [c.block for c in verdict.culprits]
    worst = max(r.ratio or 0 for comparison in (judged.comparison, judged.isolated) for r in comparison.results)
    assert worst >= 2, f"{name} caught at a ratio of only {worst:.2f}"
    assert verdict.not_isolated == []
    if fault.block is not None:
        assert culprits == [fault.block.test_id], f"{name}: culprits in isolation {culprits}"
    else:
        outside = verdict.isolated_failures_outside_blocks
        assert any(fault.names(r.component, r.name) for r in outside), \
            f"{name}: isolation blames {culprits} {[r.key for r in outside[:3]]}"
        assert culprits == [], f"{name}: no block is at fault, yet isolation blames {culprits}"


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_clean_runs_raise_no_false_alarm(seed, dtype, backend):
    verdict = _judged(backend, seed=seed, dtype=dtype, scheduler="pndm").verdict
    assert verdict.status == "parity", verdict.text
    assert verdict.culprits == [], verdict.culprits


def test_ddim_with_eta_runs_end_to_end_at_parity(tmp_path):
    """`parity run --scheduler ddim --eta 1` on both backends: the reference draws its noise from the
    seeded generator (eta reaches the scheduler), each candidate replays it, and both come out at parity."""
    import json

    from sd_parity.cli import main
    from sd_parity.runs.hdf5 import RunReader

    assert main(["run", "--model", "tiny-sd1", "--scheduler", "ddim", "--eta", "1", "--steps", "2",
                 "--output-dir", str(tmp_path)]) == 0
    for backend in ("numpy", "torch"):
        summary = json.loads((tmp_path / f"txt2img-ddim-{backend}-fp32" / "summary.json").read_text())
        assert summary["verdict"]["exit_code"] == 0, summary["verdict"]["text"]
        runs = summary["runs"]
        with RunReader(runs["reference"]["path"]) as ref, RunReader(runs["candidate"]["path"]) as cand:
            assert ref.metadata["eta"] == 1.0
            noise = ref.read("pipeline/step_000/noise")
            assert noise.std() > 0.5 and (cand.read("pipeline/step_000/noise") == noise).all()
