"""tiny-sd1-stress: activations shaped like trained SD's where numerics depend on them, so that numeric porting
bugs that random O(1) weights hide are caught, while correct implementations stay at parity.

docs/stress.md documents the shaping and the statistics asserted here; docs/tolerances.md the figures.
"""
import json

import numpy as np
import pytest

from sd_parity.candidates.faults import FAULTS
from sd_parity.cases.case import Case, reference_run, run_case
from sd_parity.fixtures import FIXTURES, STRESS_SUFFIX, ensure_fixture
from sd_parity.runs.config import RunConfig
from sd_parity.runs.open import open_run

from stress_statistics import statistics

STRESS = "tiny-sd1-stress"
BASE = dict(steps=3, prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry")
NUMERIC_FAULTS = ("transformer_norm_eps", "vae_groupnorm_eps", "softmax_no_max_fp16")
FP16_EXP_OVERFLOW = float(np.log(65504.0))  # 11.09: exp() of a larger logit is Inf in float16
FP32_EXP_OVERFLOW = float(np.log(np.finfo(np.float32).max))  # 88.7


def _statistics(model: str) -> dict[str, float]:
    folder = ensure_fixture(model)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    run = reference_run(RunConfig(model=model, **BASE))
    return statistics(run, unet["norm_num_groups"], vae["norm_num_groups"], unet["attention_head_dim"])


def test_stress_fixture_has_the_documented_statistics():
    """Near-eps groups at both shaped GroupNorms, logits that overflow float16's exp (but not float32's),
    a VAE beyond float16's range, and residual streams with a large dynamic range; tiny-sd1 has none."""
    stress, plain = _statistics(STRESS), _statistics("tiny-sd1")
    for norm in ("unet_norm", "vae_norm"):
        assert 1e-7 < stress[f"{norm}_min_group_var"] <= stress[f"{norm}_smallest_group_max_var"] < 1e-5, stress
        assert plain[f"{norm}_min_group_var"] > 0.1, plain
    assert FP16_EXP_OVERFLOW < stress["max_self_attention_logit"] < FP32_EXP_OVERFLOW
    assert plain["max_self_attention_logit"] < FP16_EXP_OVERFLOW
    assert stress["vae_decoder_max_abs"] > 65504 > plain["vae_decoder_max_abs"]
    assert stress["unet_stream_channel_range"] > 20 > 5 > plain["unet_stream_channel_range"]
    assert stress["text_stream_channel_range"] > 10 > plain["text_stream_channel_range"]


def test_stress_variants_exist_for_every_full_size_architecture():
    for name in ("sd15-arch", "sd21-arch", "sdxl-arch"):
        spec = FIXTURES[name + STRESS_SUFFIX]
        assert {k: v for k, v in spec.items() if k != "stress"} == FIXTURES[name]


def _faulted_ratio(summary, fault) -> float:
    component, path = fault.where[0]
    rows = [r for r in summary["tensors"] if r["component"] == component and r["name"] == path and r["ratio"] is not None]
    return max(r["ratio"] for r in rows)


@pytest.mark.parametrize("name", NUMERIC_FAULTS)
def test_numeric_faults_are_caught_and_located_on_the_stress_fixture(tmp_path, name):
    """Detected with ratio >= 3 at the faulted module, which is the first divergence (free mode) and the
    only culprit (isolated mode); on tiny-sd1 the same bug is at most barely visible."""
    fault = FAULTS[name]
    stress = run_case(Case(RunConfig(model=STRESS, dtype=fault.dtype, **BASE), "torch", fault=name), tmp_path / "s").summary
    assert stress["verdict"]["status"] == "divergence"
    first = stress["first_divergence"]
    assert fault.names(first["component"], first["name"]), first["key"]
    assert [c["block"] for c in stress["culprits"]] == [fault.block.test_id]
    assert _faulted_ratio(stress, fault) >= 3
    plain = run_case(Case(RunConfig(model="tiny-sd1", dtype=fault.dtype, **BASE), "torch", fault=name), tmp_path / "p").summary
    assert _faulted_ratio(stress, fault) > 100 * _faulted_ratio(plain, fault)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_clean_runs_stay_at_parity_on_the_stress_fixture(tmp_path, dtype, backend):
    summary = run_case(Case(RunConfig(model=STRESS, dtype=dtype, scheduler="pndm", seed=1, **BASE), backend),
                       tmp_path / "case").summary
    verdict = summary["verdict"]
    assert verdict["status"] == "parity" and summary["culprits"] == [], verdict["text"]
    overflow = verdict["reference_overflow"]
    if dtype != "fp16":
        assert overflow is None
        return
    # float16: the reference's own VAE overflows where the fixture puts activations beyond 65504, as SD's
    # VAEs do; the verdict says so, and parity there means NaN/Inf at the same places
    assert overflow["first"] == "vae_decoder/call_0/decoder.up_blocks.3.resnets.0.conv2", overflow
    assert "the reference itself is not finite" in verdict["text"]
    unet = [r for r in summary["tensors"] if r["component"] in ("text_encoder", "unet") and (r["metrics"] or {}).get("kind") == "float"]
    assert all(r["metrics"]["ref_nan"] + r["metrics"]["ref_inf"] == 0 for r in unet)
    with open_run(summary["runs"]["candidate"]["path"]) as run:
        assert np.isnan(run.read("pipeline/main/image")).all()
