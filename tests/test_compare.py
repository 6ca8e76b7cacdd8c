"""The comparison engine: tolerances, calibration, overrides, coverage, verdicts, name maps, outputs, CLI.

Run files are synthesized with RunWriter; nothing here needs torch or a model.
"""
import json
import math
import tracemalloc
import weakref
import xml.etree.ElementTree as ET

import ml_dtypes
import numpy as np
import pytest

from sd_parity.judging import compare as compare_module, pool
from sd_parity.cli import main as cli_main
from sd_parity.judging.compare import compare_runs
from sd_parity.judging.metrics import tensor_metrics
from sd_parity.judging.name_map import NameMap, NameMapError
from sd_parity.runs.hdf5 import RunReader, RunWriter
from sd_parity.reports.summary import (SCHEMA_VERSION, build_summary, format_table, load_summary, render_outputs,
                                      summary_json_text)
from sd_parity.judging.tolerances import DEFAULT_K, DTYPE_DEFAULTS, ToleranceConfigError, Tolerances, judge
from sd_parity.judging.verdict import make_verdict

BF16 = ml_dtypes.bfloat16
META = {"impl": "test", "prompt": "a red cube", "seed": 0, "steps": 2, "mode": "free"}


def write_run(path, tensors, **meta):
    """tensors: {(component, invocation, name): array} in execution order."""
    with RunWriter(path, {**META, **meta}) as writer:
        for (component, invocation, name), array in tensors.items():
            writer.write(component, invocation, name, array)
    return path


def unet_run(seed=0, steps=2, blocks=3, offset=None, dtype=np.float32, size=64):
    """A small 'UNet' capture: per step and block, the block input, an inner module, the block output.

    offset: {(step, block): value} added to that block's inner and output tensors (a bug in the block).
    """
    rng = np.random.default_rng(seed)
    tensors = {("pipeline", "main", "input_ids"): np.arange(8, dtype=np.int64)[None]}
    for step in range(steps):
        inv = f"step_{step:03d}"
        for block in range(blocks):
            x = rng.standard_normal(size).astype(np.float32)
            y = rng.standard_normal(size).astype(np.float32)
            if offset and (step, block) in offset:
                y = y + np.float32(offset[(step, block)])
            tensors[("unet", inv, f"down_blocks.{block}@0")] = x.astype(dtype)
            tensors[("unet", inv, f"down_blocks.{block}.resnets.0")] = y.astype(dtype)
            tensors[("unet", inv, f"down_blocks.{block}")] = y.astype(dtype)
        tensors[("pipeline", inv, "latents")] = rng.standard_normal(size).astype(dtype)
    return tensors


def pair_run(folder, ref_array, cand_array, name="t", **meta):
    folder.mkdir(parents=True, exist_ok=True)
    ref = write_run(folder / "ref.h5", {("unet", "step_000", name): ref_array})
    cand = write_run(folder / "cand.h5", {("unet", "step_000", name): cand_array}, **meta)
    return ref, cand


def statuses(comparison):
    return {r.key: r.status for r in comparison.results}


# ---------------------------------------------------------------------------------------------------
# tolerance decisions


def _ulps_up(values, ulps, dtype):
    """values (positive, exactly representable in dtype) moved up by a whole number of ULPs of dtype."""
    np_dtype = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    bits = {2: np.int16, 4: np.int32, 8: np.int64}[np.dtype(np_dtype).itemsize]
    return (values.astype(np_dtype).view(bits) + ulps).view(np_dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_default_tolerance_is_normwise_per_dtype(dtype):
    rule = Tolerances().rule_for("unet", "step_000", "x", dtype)
    assert (rule.rtol, rule.atol) == DTYPE_DEFAULTS[dtype]
    rng = np.random.default_rng(1)
    r = rng.standard_normal(100_000)
    direction = rng.standard_normal(r.size)
    direction *= np.linalg.norm(r) / np.linalg.norm(direction)
    np_dtype = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    for share, expected in ((0.5, True), (2.0, False)):
        c = (r + share * rule.rtol * direction).astype(np_dtype)
        rounded = r.astype(np_dtype)
        m = tensor_metrics(rounded, c, rtol=rule.rtol, atol=rule.atol)
        decision = judge(m, rule)
        assert decision.mode == "normwise" and decision.passed is expected, (dtype, share, m.rel_l2)


def test_normwise_error_scales_with_the_tensor_not_the_element():
    """Deep in a network every element carries error of the tensor's scale, also where it is ~0: that
    passes; an error of the same size confined to the large elements is no different; a 2x larger one fails."""
    rng = np.random.default_rng(2)
    r = rng.standard_normal(200_000).astype(np.float32)
    rule = Tolerances().rule_for("unet", "main", "x", "float32")
    rms = float(np.sqrt(np.mean(r.astype(np.float64) ** 2)))
    for size, expected in ((0.5 * rule.rtol, True), (2 * rule.rtol, False)):
        c = (r + size * rms * rng.standard_normal(r.size)).astype(np.float32)  # the same absolute error everywhere
        m = tensor_metrics(r, c, rtol=rule.rtol, atol=rule.atol)
        assert m.allclose_violations > 0  # an elementwise rtol * |r| test would fail near the zeros
        assert judge(m, rule).passed is expected


def test_a_tensor_in_another_dtype_fails_unless_an_override_allows_it(tmp_path):
    rng = np.random.default_rng(0)
    r = rng.standard_normal(4096).astype(np.float32)
    ref, cand = pair_run(tmp_path / "a", r, r.astype(np.float16))
    result = compare_runs(ref, cand).results[0]
    assert result.status == "fail"
    assert [c["name"] for c in result.decision.criteria if not c["passed"]] == ["dtype"]
    assert any("dtype differs" in note for note in result.notes)
    allow = Tolerances.from_table({"overrides": [
        {"pattern": "t", "any_dtype": True, "reason": "the port keeps this activation in fp16 on purpose"}]})
    allowed = compare_runs(ref, cand, tolerances=allow).results[0]
    assert allowed.status == "pass" and allowed.decision.settings["rtol"] == DTYPE_DEFAULTS["float16"][0]
    # integer tensors in another integer type are not a dtype failure: they hold the same values
    ids = np.arange(8, dtype=np.int64)[None]
    ref2, cand2 = pair_run(tmp_path / "b", ids, ids.astype(np.int32), name="input_ids")
    assert compare_runs(ref2, cand2).results[0].status == "pass"


def test_outlier_guard_fails_a_single_wild_element():
    r = np.linspace(1, 2, 1_000_000).astype(np.float32)
    c = r.copy()
    c[500] += 0.01  # far below the tensor's norm budget, far above any element's
    rule = Tolerances().rule_for("unet", "main", "x", "float32")
    decision = judge(tensor_metrics(r, c, rtol=rule.rtol, atol=rule.atol), rule)
    assert not decision.passed
    assert [c["name"] for c in decision.criteria if not c["passed"]] == ["outlier"]


def test_nan_where_reference_is_finite_fails():
    r = np.ones(10, np.float32)
    c = r.copy()
    c[3] = np.nan
    rule = Tolerances().rule_for("unet", "main", "x", "float32")
    decision = judge(tensor_metrics(r, c, rtol=rule.rtol, atol=rule.atol), rule)
    assert not decision.passed and "nonfinite" in decision.reason
    same = r.copy()
    same[3] = np.nan
    assert judge(tensor_metrics(same, c, rtol=rule.rtol, atol=rule.atol), rule).passed  # NaN at the same place


def test_integer_tensors_must_match_exactly(tmp_path):
    ids = np.array([[49406, 320, 49407]], np.int64)
    ref, cand = pair_run(tmp_path, ids, ids + np.array([[0, 1, 0]]), name="input_ids")
    result = compare_runs(ref, cand).results[0]
    assert result.status == "fail" and result.decision.mode == "exact"
    assert result.metrics.mismatches == 1
    # a uint8 image may be one level off in 0.1% of its pixels: one of 48 is too many by default,
    # an override may allow more, never silently
    image = np.full((1, 4, 4, 3), 128, np.uint8)
    off = image.copy()
    off[0, 1, 2, 0] = 129
    ref2, cand2 = pair_run(tmp_path / "img", image, off, name="image_uint8")
    assert compare_runs(ref2, cand2).results[0].status == "fail"
    loose = Tolerances.from_table({"overrides": [
        {"pattern": "image_uint8", "atol": 1, "quantile": 0.9, "reason": "a tiny image: one flipped pixel is 2%"}]})
    assert compare_runs(ref2, cand2, tolerances=loose).results[0].status == "pass"
    off[0, 0, 0, 0] = 130
    ref3, cand3 = pair_run(tmp_path / "img2", image, off, name="image_uint8")
    assert compare_runs(ref3, cand3, tolerances=loose).results[0].status == "fail"


# ---------------------------------------------------------------------------------------------------
# calibrated mode


def _calibrated(folder, ref_noise, cand_noise, *, dtype=np.float32, config=None, n=4096):
    rng = np.random.default_rng(5)
    oracle = rng.standard_normal(n)
    unit = rng.standard_normal(n)
    ref = (oracle + ref_noise * unit * np.abs(oracle)).astype(dtype)
    cand = (oracle + cand_noise * unit[::-1] * np.abs(oracle)).astype(dtype)
    key = ("unet", "step_000", "down_blocks.0")
    folder.mkdir(parents=True, exist_ok=True)
    o = write_run(folder / "oracle.h5", {key: oracle}, dtype="fp64")
    r = write_run(folder / "ref.h5", {key: ref})
    c = write_run(folder / "cand.h5", {key: cand})
    tolerances = Tolerances.from_table(config) if config else None
    return compare_runs(r, c, oracle_path=o, tolerances=tolerances).results[0]


def test_calibrated_passes_within_k_times_the_reference_error(tmp_path):
    k = DEFAULT_K["float32"]
    result = _calibrated(tmp_path, ref_noise=1e-4, cand_noise=(k - 0.5) * 1e-4)
    assert result.decision.mode == "calibrated"
    s = result.decision.settings
    assert s["k"] == k and s["statistic"] == "rel_l2"
    assert s["ref_error"] == pytest.approx(1e-4, rel=0.1)
    assert s["limit"] == pytest.approx(k * s["ref_error"] + 2 * 2.0 ** -23)  # the floor: 2 ULPs
    assert result.status == "pass"


def test_calibrated_fails_beyond_k_times_the_reference_error(tmp_path):
    result = _calibrated(tmp_path, ref_noise=1e-4, cand_noise=(DEFAULT_K["float32"] + 1) * 1e-4)
    assert result.status == "fail"
    assert "calibrated" in result.decision.reason


def test_calibrated_k_is_configurable(tmp_path):
    k = DEFAULT_K["float32"] + 2
    config = {"tolerances": {"float32": {"k": k, "reason": "test: looser calibration"}}}
    result = _calibrated(tmp_path, ref_noise=1e-4, cand_noise=(k - 1) * 1e-4, config=config)
    assert result.decision.settings["k"] == k and result.status == "pass"


def test_calibrated_floor_covers_a_reference_equal_to_the_oracle(tmp_path):
    # the reference is the oracle rounded to fp32 (its error is only rounding); the candidate is 1 ULP off
    near = _calibrated(tmp_path / "near", ref_noise=0.0, cand_noise=2.0 ** -24)
    assert near.status == "pass"
    far = _calibrated(tmp_path / "far", ref_noise=0.0, cand_noise=2.0 ** -18)
    assert far.status == "fail"


def test_calibrated_fp16_uses_its_own_k(tmp_path):
    k = DEFAULT_K["float16"]
    result = _calibrated(tmp_path, ref_noise=1e-3, cand_noise=(k - 0.5) * 1e-3, dtype=np.float16)
    assert result.decision.settings["k"] == k
    assert result.decision.settings["floor"] == 2 * 2.0 ** -10
    assert result.status == "pass"


def test_calibrated_falls_back_when_the_oracle_lacks_a_tensor(tmp_path):
    key, other = ("unet", "step_000", "a"), ("unet", "step_000", "b")
    x = np.ones(8, np.float32)
    o = write_run(tmp_path / "o.h5", {key: np.ones(8)})
    r = write_run(tmp_path / "r.h5", {key: x, other: x})
    c = write_run(tmp_path / "c.h5", {key: x, other: x})
    results = compare_runs(r, c, oracle_path=o).results
    assert results[0].decision.mode == "calibrated"
    assert results[1].decision.mode == "normwise"
    assert any("not in the oracle run" in n for n in results[1].notes)


# ---------------------------------------------------------------------------------------------------
# configuration and overrides


def test_override_requires_a_reason():
    with pytest.raises(ToleranceConfigError, match="reason"):
        Tolerances.from_table({"overrides": [{"pattern": "unet/*/down_blocks.1*", "rtol": 1e-3}]})
    with pytest.raises(ToleranceConfigError, match="reason"):
        Tolerances.from_table({"overrides": [{"pattern": "x", "skip": True, "reason": "  "}]})
    with pytest.raises(ToleranceConfigError, match="reason"):
        Tolerances.from_table({"tolerances": {"float16": {"rtol": 1e-2}}})


def test_config_errors_name_the_problem():
    with pytest.raises(ToleranceConfigError, match="unknown keys"):
        Tolerances.from_table({"overrides": [{"pattern": "x", "rtl": 1, "reason": "typo"}]})
    with pytest.raises(ToleranceConfigError, match="changes nothing"):
        Tolerances.from_table({"overrides": [{"pattern": "x", "reason": "r"}]})
    with pytest.raises(ToleranceConfigError, match="quantile"):
        Tolerances.from_table({"tolerances": {"quantile": 1.5, "reason": "r"}})


def test_first_matching_override_wins_and_patterns_match_keys_or_names():
    tol = Tolerances.from_table({"overrides": [
        {"pattern": "unet/step_00?/down_blocks.1.*", "rtol": 1e-2, "reason": "known fp32 reordering in block 1"},
        {"pattern": "*.resnets.0", "atol": 1e-3, "reason": "resnets"},
        {"regex": r"latents$", "skip": True, "reason": "latents checked elsewhere"},
    ]})
    rtol, atol = DTYPE_DEFAULTS["float32"]
    a = tol.rule_for("unet", "step_003", "down_blocks.1.resnets.0", "float32")
    assert a.rtol == 1e-2 and a.atol == atol and a.override.reason == "known fp32 reordering in block 1"
    b = tol.rule_for("unet", "step_003", "down_blocks.2.resnets.0", "float32")
    assert b.atol == 1e-3 and b.rtol == rtol
    assert tol.rule_for("pipeline", "step_000", "latents", "float32").skip
    assert tol.rule_for("unet", "step_010", "down_blocks.1.resnets.0", "float32").override.pattern == "*.resnets.0"
    # brackets in names are literal, not glob character classes
    tol2 = Tolerances.from_table({"overrides": [{"pattern": "text_model[0]", "atol": 1, "reason": "r"}]})
    assert tol2.rule_for("text_encoder", "main", "text_model[0]", "float32").atol == 1
    assert tol2.rule_for("text_encoder", "main", "text_model0", "float32").override is None


def test_skip_override_is_listed_not_silent(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    cand = write_run(tmp_path / "c.h5", unet_run(offset={(0, 2): 1.0, (1, 2): 1.0}))
    config = tmp_path / "parity.toml"
    config.write_text('[[overrides]]\npattern = "unet/*/down_blocks.2*"\nskip = true\n'
                      'reason = "block 2 is rewritten upstream"\n')
    comparison = compare_runs(ref, cand, tolerances=config)
    assert comparison.coverage.counts["skipped"] == 6
    assert comparison.coverage.counts["fail"] == 0
    assert all("block 2 is rewritten upstream" in s["note"] for s in comparison.coverage.skipped)
    assert make_verdict(comparison).status == "parity"


def test_loosened_override_turns_fail_into_pass(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    cand = write_run(tmp_path / "c.h5", unet_run(offset={(0, 1): 1e-3}))
    assert compare_runs(ref, cand).coverage.counts["fail"] == 2
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n\n[tool.parity]\ncapture = "blocks"\n\n'
                         '[[tool.parity.overrides]]\npattern = "down_blocks.1*"\natol = 2e-3\n'
                         'reason = "fused kernel, measured 1e-3 max"\n')
    tol = Tolerances.load(pyproject)
    comparison = compare_runs(ref, cand, tolerances=tol)
    assert comparison.coverage.counts["fail"] == 0
    passed = [r for r in comparison.results if r.name == "down_blocks.1" and r.invocation == "step_000"][0]
    assert passed.decision.source == "override"
    assert passed.decision.override["reason"] == "fused kernel, measured 1e-3 max"
    assert Tolerances.discover(tmp_path).source == str(pyproject)


# ---------------------------------------------------------------------------------------------------
# coverage


def test_coverage_lists_missing_extra_shape_and_dtype(tmp_path):
    x = np.ones((1, 4, 2), np.float32)
    ref = write_run(tmp_path / "r.h5", {
        ("unet", "step_000", "a"): x, ("unet", "step_000", "b"): x, ("unet", "step_000", "c"): x,
        ("unet", "step_000", "d"): x, ("unet", "step_001", "a"): x})
    cand = write_run(tmp_path / "c.h5", {
        ("unet", "step_000", "a"): x.astype(np.float16),
        ("unet", "step_000", "b"): np.ones((1, 8), np.float32),
        ("unet", "step_000", "c"): x.reshape(4, 2),
        ("unet", "step_000", "extra"): x})
    comparison = compare_runs(ref, cand)
    assert statuses(comparison) == {  # a is in another dtype: it fails though its values are equal
        "unet/step_000/a": "fail", "unet/step_000/b": "shape_mismatch", "unet/step_000/c": "pass",
        "unet/step_000/d": "missing", "unet/step_001/a": "missing", "unet/step_000/extra": "extra"}
    cov = comparison.coverage
    assert cov.missing == ["unet/step_000/d", "unet/step_001/a"]
    assert cov.extra == ["unet/step_000/extra"]
    assert cov.shape_mismatch == [{"key": "unet/step_000/b", "ref_shape": [1, 4, 2], "cand_shape": [1, 8]}]
    assert cov.dtype_differences == [{"key": "unet/step_000/a", "ref_dtype": "float32", "cand_dtype": "float16"}]
    assert cov.missing_invocations == ["unet/step_001"]
    squeezed = [r for r in comparison.results if r.name == "c"][0]
    assert any("size-1" in note for note in squeezed.notes)
    # rows: reference order first, then the candidate's extras
    assert [r.order for r in comparison.results] == [0, 1, 2, 3, 4, None]
    verdict = make_verdict(comparison)
    assert verdict.status == "divergence" and verdict.first_divergence.name == "a"


def test_missing_only_is_incomplete_not_parity(tmp_path):
    tensors = unet_run()
    ref = write_run(tmp_path / "r.h5", tensors)
    fewer = {k: v for k, v in tensors.items() if k[1] != "step_001"}
    cand = write_run(tmp_path / "c.h5", fewer)
    comparison = compare_runs(ref, cand)
    verdict = make_verdict(comparison)
    assert verdict.status == "incomplete" and verdict.exit_code == 1
    assert "unet/step_001" in comparison.coverage.missing_invocations
    assert "pipeline/step_001" in comparison.coverage.missing_invocations
    # one step is 3 blocks x 3 tensors + the latents; input_ids and step 0 (11 tensors) still match
    assert verdict.text.startswith("incomplete: 10 reference tensor(s) missing")
    assert verdict.text.endswith("; 11 compared tensors within tolerance")


def test_metadata_differences_are_warned(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    cand = write_run(tmp_path / "c.h5", unet_run(), seed=1)
    warnings = compare_runs(ref, cand).warnings
    assert any("seed" in w for w in warnings)


# ---------------------------------------------------------------------------------------------------
# verdicts


def test_parity_verdict(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    same = make_verdict(compare_runs(ref, write_run(tmp_path / "same.h5", unet_run())))
    assert same.status == "parity" and same.identical and same.exit_code == 0
    assert same.text == "identical: all 21 tensors bit for bit the reference's"
    tensors = unet_run()
    key = ("unet", "step_001", "down_blocks.2")
    tensors[key] = tensors[key] * np.float32(1 + 1e-6)
    close = make_verdict(compare_runs(ref, write_run(tmp_path / "close.h5", tensors)))
    assert close.status == "parity" and not close.identical
    assert close.text == "parity: 21 tensors within tolerance"


def test_first_divergence_and_culprit_in_isolation(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    # free run: block 1 is wrong at step 0, and everything after it inherits the error
    offsets = {(s, b): 0.5 for s in range(2) for b in range(3) if (s, b) >= (0, 1)}
    free = write_run(tmp_path / "free.h5", unet_run(offset=offsets))
    isolated = write_run(tmp_path / "iso.h5", unet_run(offset={(0, 1): 0.5, (1, 1): 0.5}), mode="isolated")
    comparison = compare_runs(ref, free)
    iso = compare_runs(ref, isolated)
    verdict = make_verdict(comparison, iso)
    first = verdict.first_divergence
    assert (first.component, first.invocation, first.name) == ("unet", "step_000", "down_blocks.1.resnets.0")
    assert first.block_id == "unet_block_1_down"
    assert [c.block for c in verdict.culprits] == ["unet_block_1_down"]
    assert verdict.culprits[0].invocations == ["step_000", "step_001"]
    assert verdict.text.startswith("first divergence at unet/step_000/down_blocks.1.resnets.0 (block "
                                   "unet_block_1_down); its block unet_block_1_down is a culprit in isolation")
    assert verdict.first_block_is_culprit is True and verdict.exit_code == 1


def test_accumulated_error_when_no_block_fails_alone(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    free = write_run(tmp_path / "free.h5", unet_run(offset={(1, 0): 1e-3, (1, 1): 1e-2, (1, 2): 1e-1}))
    isolated = write_run(tmp_path / "iso.h5", unet_run(), mode="isolated")
    verdict = make_verdict(compare_runs(ref, free), compare_runs(ref, isolated))
    assert verdict.culprits == []
    assert verdict.text.startswith("first divergence at unet/step_001/down_blocks.0.resnets.0 (block "
                                   "unet_block_0_down); error accumulates: no block exceeds its threshold alone")


def test_divergence_without_isolated_run_says_how_to_find_the_culprit(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    free = write_run(tmp_path / "free.h5", unet_run(offset={(0, 2): 1.0}))
    verdict = make_verdict(compare_runs(ref, free))
    assert verdict.first_divergence.block_id == "unet_block_2_down"
    assert "--isolated" in verdict.text and verdict.first_block_is_culprit is None


def test_a_block_not_fed_the_references_inputs_is_not_named_a_culprit(tmp_path):
    """An isolated run whose block inputs are not the reference's did not isolate that block: its
    failing outputs name no culprit, and the verdict says the run was not isolated there."""
    ref = write_run(tmp_path / "r.h5", unet_run())
    free = write_run(tmp_path / "free.h5", unet_run(offset={(0, 1): 0.5}))
    tensors = unet_run(offset={(0, 1): 0.5})
    key = ("unet", "step_000", "down_blocks.1@0")
    tensors[key] = tensors[key] + np.float32(1e-3)  # the candidate ran block 1 on its own upstream result
    isolated = write_run(tmp_path / "iso.h5", tensors, mode="isolated")
    verdict = make_verdict(compare_runs(ref, free), compare_runs(ref, isolated))
    assert verdict.status == "divergence" and verdict.culprits == []
    assert verdict.not_isolated == ["unet_block_1_down"]
    assert "not isolated at unet_block_1_down" in verdict.text
    # fed the reference's inputs exactly (a wider dtype holding the same values is fine), it is a culprit
    widened = unet_run(offset={(0, 1): 0.5})
    widened[key] = widened[key].astype(np.float64)
    good = write_run(tmp_path / "iso2.h5", widened, mode="isolated")
    verdict = make_verdict(compare_runs(ref, free), compare_runs(ref, good))
    assert [c.block for c in verdict.culprits] == ["unet_block_1_down"] and verdict.not_isolated == []


def test_a_failure_seen_only_in_isolation_is_its_own_status(tmp_path):
    """Never "parity ... but culprit X": a block that fails only when fed the reference's inputs is a
    divergence in isolation (exit 1), unless the config says such failures pass."""
    ref = write_run(tmp_path / "r.h5", unet_run())
    free = write_run(tmp_path / "free.h5", unet_run())
    isolated = write_run(tmp_path / "iso.h5", unet_run(offset={(1, 2): 0.5}), mode="isolated")
    verdict = make_verdict(compare_runs(ref, free), compare_runs(ref, isolated))
    assert verdict.status == "isolation_only" and verdict.exit_code == 1
    assert [c.block for c in verdict.culprits] == ["unet_block_2_down"]
    assert verdict.text.startswith("divergence in isolation only: fed the reference's inputs, unet_block_2_down")
    tolerant = Tolerances.from_table({"tolerances": {"isolation_only": "pass",
                                                     "reason": "our port's blocks are checked elsewhere"}})
    verdict = make_verdict(compare_runs(ref, free, tolerances=tolerant), compare_runs(ref, isolated))
    assert verdict.status == "isolation_only" and verdict.exit_code == 0
    with pytest.raises(ToleranceConfigError, match="isolation_only"):
        Tolerances.from_table({"tolerances": {"isolation_only": "maybe", "reason": "r"}})


def test_warnings_say_which_comparison_raised_them(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    free = write_run(tmp_path / "free.h5", unet_run(), seed=1)
    isolated = write_run(tmp_path / "iso.h5", unet_run(), seed=2, mode="isolated")
    assert [w.split(":")[0] for w in compare_runs(ref, free).warnings] == ["free run"]
    assert [w.split(":")[0] for w in compare_runs(ref, isolated).warnings] == ["isolated run"]


def test_an_fp16_run_and_its_fp64_oracle_start_from_the_same_x_T(tmp_path):
    """The cause of the old "x_T differs" warning on every fp16 comparison: the fp16 reference starts from
    the fixture's x_T rounded to fp16, the oracle from the fixture's x_T. Compared by value, they agree."""
    x_t = np.random.default_rng(7).standard_normal((1, 4, 8, 8))
    key = ("pipeline", "main", "x_T")
    ref = write_run(tmp_path / "r.h5", {key: x_t.astype(np.float16)}, dtype="fp16")
    cand = write_run(tmp_path / "c.h5", {key: x_t.astype(np.float16)}, dtype="fp16")
    oracle = write_run(tmp_path / "o.h5", {key: x_t.astype(np.float32).astype(np.float64)}, dtype="fp64")
    assert compare_runs(ref, cand, oracle_path=oracle).warnings == []
    other = write_run(tmp_path / "other.h5", {key: -x_t}, dtype="fp64")
    assert ["another x_T" in w for w in compare_runs(ref, cand, oracle_path=other).warnings] == [True]


def _guided_step(rng, scale=7.5, n=4096):
    uncond = rng.standard_normal(n).astype(np.float32)
    text = (uncond + 0.05 * rng.standard_normal(n)).astype(np.float32)  # the halves differ a little
    guided = uncond + np.float32(scale) * (text - uncond)
    return {("pipeline", "step_000", "noise_pred_uncond"): uncond, ("pipeline", "step_000", "noise_pred_text"): text,
            ("pipeline", "step_000", "noise_pred"): guided}


def test_guided_noise_prediction_is_judged_from_its_own_halves(tmp_path):
    """Halves within tolerance give a guided prediction whose difference is amplified by the guidance
    scale; it passes because it is the guidance combination of the candidate's own halves, and the
    same prediction with the halves swapped fails."""
    rng = np.random.default_rng(3)
    ref = write_run(tmp_path / "r.h5", _guided_step(rng), guidance=7.5)
    step = _guided_step(np.random.default_rng(3))
    rtol = DTYPE_DEFAULTS["float32"][0]
    for name in ("noise_pred_uncond", "noise_pred_text"):  # each half off by 0.7 of its budget, independently
        half = step[("pipeline", "step_000", name)]
        step[("pipeline", "step_000", name)] = (half * (1 + 0.7 * rtol * rng.choice([-1, 1], half.size))
                                                ).astype(np.float32)
    uncond, text = step[("pipeline", "step_000", "noise_pred_uncond")], step[("pipeline", "step_000", "noise_pred_text")]
    step[("pipeline", "step_000", "noise_pred")] = uncond + np.float32(7.5) * (text - uncond)
    comparison = compare_runs(ref, write_run(tmp_path / "c.h5", step, guidance=7.5))
    guided = comparison.results[2]
    assert guided.metrics.rel_l2 > rtol  # on its own, the guided prediction would fail
    assert guided.status == "pass" and guided.decision.mode == "derived"
    assert all(r.status == "pass" for r in comparison.results)
    step[("pipeline", "step_000", "noise_pred")] = text + np.float32(7.5) * (uncond - text)
    swapped = compare_runs(ref, write_run(tmp_path / "swapped.h5", step, guidance=7.5)).results[2]
    assert swapped.status == "fail" and swapped.decision.criteria[0]["name"] == "derived"


def test_the_8bit_image_is_judged_from_its_own_float_image(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.random((1, 16, 16, 3)).astype(np.float32)
    shifted = (image + 2e-3).clip(0, 1).astype(np.float32)  # a float difference that flips many 8-bit levels
    tensors = lambda x, u8: {("pipeline", "main", "image"): x, ("pipeline", "main", "image_uint8"): u8}  # noqa: E731
    ref = write_run(tmp_path / "r.h5", tensors(image, (image * 255).round().astype(np.uint8)))
    rounded = compare_runs(ref, write_run(tmp_path / "c.h5", tensors(shifted, (shifted * 255).round().astype(np.uint8))))
    assert rounded.results[1].metrics.mismatches > 10 and rounded.results[1].status == "pass"
    truncated = compare_runs(ref, write_run(tmp_path / "t.h5", tensors(shifted, (shifted * 255).astype(np.uint8))))
    assert truncated.results[1].status == "fail"  # floor instead of round: a conversion bug


def test_the_float_image_is_judged_from_its_own_decoder_output(tmp_path):
    """An fp16 run's image is float32, with the error of its fp16 decoder output: judged from that output,
    a candidate within fp16 tolerance passes; an image not computed as clamp(x / 2 + 0.5) fails."""
    rng = np.random.default_rng(8)
    x = rng.uniform(-1.2, 1.2, (1, 3, 16, 16)).astype(np.float16)
    image = lambda x: np.moveaxis(np.clip(x.astype(np.float32) / 2 + 0.5, 0, 1), 1, -1)  # noqa: E731
    tensors = lambda x, img: {("vae_decoder", "call_0", "0"): x, ("pipeline", "main", "image"): img}  # noqa: E731
    ref = write_run(tmp_path / "r.h5", tensors(x, image(x)))
    other = (x.astype(np.float32) * (1 + 1e-3 * rng.standard_normal(x.shape))).astype(np.float16)
    result = compare_runs(ref, write_run(tmp_path / "c.h5", tensors(other, image(other)))).results
    assert result[0].status == "pass" and result[1].status == "pass" and result[1].decision.mode == "derived"
    assert result[1].metrics.rel_l2 > DTYPE_DEFAULTS["float32"][0]  # as a float32 tensor alone it would fail
    unscaled = np.moveaxis(np.clip(other.astype(np.float32), 0, 1), 1, -1)
    assert compare_runs(ref, write_run(tmp_path / "u.h5", tensors(other, unscaled))).results[1].status == "fail"


def test_isolated_runs_are_calibrated_on_the_block_local_oracle_first(tmp_path):
    """The block-local oracle (the block re-run in fp64 on the reference's inputs) calibrates the
    tensors it holds; the whole-run oracle the rest."""
    key, outside = ("unet", "step_000", "down_blocks.0"), ("unet", "step_000", "conv_out")
    rng = np.random.default_rng(6)
    exact = rng.standard_normal(4096)
    r = write_run(tmp_path / "r.h5", {key: exact.astype(np.float32), outside: exact.astype(np.float32)})
    c = write_run(tmp_path / "c.h5", {key: exact.astype(np.float32), outside: exact.astype(np.float32)},
                  mode="isolated")
    block = write_run(tmp_path / "b.h5", {key: exact}, dtype="fp64")
    whole = write_run(tmp_path / "o.h5", {key: exact + 1e-3, outside: exact}, dtype="fp64")
    results = compare_runs(r, c, oracle_path=[block, whole]).results
    assert results[0].decision.settings["ref_error"] < 1e-7  # against the block oracle, not the whole run's
    assert results[1].decision.mode == "calibrated"


# ---------------------------------------------------------------------------------------------------
# name maps


def test_name_map_rules_in_order(tmp_path):
    x = np.arange(4, dtype=np.float32)
    ref = write_run(tmp_path / "r.h5", {
        ("text_encoder", "main", "encoder.layers.0.mlp"): x,
        ("text_encoder", "main", "encoder.layers.1.mlp"): x,
        ("unet", "step_000", "down_blocks.0.resnets.1"): x})
    cand = write_run(tmp_path / "c.h5", {
        ("text_encoder", "call_0", "layers.0.ffn"): x,
        ("text_encoder", "call_0", "layers.1.ffn"): x,
        ("unet", "step_000", "down.0.res.1"): x,
        ("unet", "step_000", "debug_probe"): x,
        ("unet", "step_000", "mystery"): x})
    names = tmp_path / "names.toml"
    names.write_text(r"""
[[rule]]
glob = "text_encoder/call_0/layers.*.ffn"
to = "text_encoder/main/encoder.layers.\\1.mlp"

[[rule]]
regex = 'unet/(step_\d+)/down\.(\d+)\.res\.(\d+)'
to = 'unet/\1/down_blocks.\2.resnets.\3'

[[rule]]
glob = "unet/*/debug_*"
drop = true
""")
    comparison = compare_runs(ref, cand, name_map=names)
    assert statuses(comparison) == {
        "text_encoder/main/encoder.layers.0.mlp": "pass", "text_encoder/main/encoder.layers.1.mlp": "pass",
        "unet/step_000/down_blocks.0.resnets.1": "pass", "unet/step_000/mystery": "extra"}
    assert comparison.coverage.unmatched_names == ["unet/step_000/mystery"]
    assert comparison.coverage.dropped_names == ["unet/step_000/debug_probe"]
    assert comparison.results[0].cand_key == "text_encoder/call_0/layers.0.ffn"


def test_name_map_errors():
    with pytest.raises(NameMapError, match="both map to"):
        NameMap.from_dict({"rule": [{"glob": "unet/*/a*", "to": "unet/step_000/a"}]}).apply(
            ["unet/step_000/a1", "unet/step_000/a2"])
    with pytest.raises(NameMapError, match="component"):
        NameMap.from_dict({"rule": [{"glob": "x/*/*", "to": "vae/main/\\2"}]}).map_key("x/main/y")
    with pytest.raises(NameMapError, match="group 3"):
        NameMap.from_dict({"rule": [{"glob": "unet/*/*", "to": "unet/\\1/\\3"}]})
    with pytest.raises(NameMapError, match="either to"):
        NameMap.from_dict({"rule": [{"glob": "unet/*/*"}]})
    dropping = NameMap.from_dict({"unmatched": "drop", "rule": []}).apply(["unet/main/x"])
    assert dropping.mapping == {} and dropping.unmatched == ["unet/main/x"] == dropping.dropped


# ---------------------------------------------------------------------------------------------------
# outputs


def _strict_json(path):
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=reject)


def test_summary_json_and_junit(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    free = write_run(tmp_path / "free.h5", unet_run(offset={(0, 1): 0.5}))
    zero = write_run(tmp_path / "z.h5", {("unet", "step_000", "z"): np.zeros(4, np.float32)})
    zero_c = write_run(tmp_path / "zc.h5", {("unet", "step_000", "z"): np.ones(4, np.float32)})
    isolated = write_run(tmp_path / "iso.h5", unet_run(offset={(0, 1): 0.5}), mode="isolated")
    comparison, iso = compare_runs(ref, free), compare_runs(ref, isolated)
    summary = build_summary(comparison, make_verdict(comparison, iso), iso)
    written = render_outputs(summary, tmp_path / "out")
    assert [p.name for p in written] == ["summary.json", "details.json.gz", "junit.xml", "report.html"]
    data = _strict_json(tmp_path / "out" / "summary.json")
    assert data["schema_version"] == SCHEMA_VERSION
    for key in ("verdict", "first_divergence", "culprits", "runs", "mode", "config", "coverage", "warnings",
                "blocks", "isolated", "timing", "details"):
        assert key in data
    assert "tensors" not in data and "tensors" not in data["isolated"]  # the rows are in details.json.gz
    assert data["runs"]["reference"]["metadata"]["prompt"] == "a red cube"
    assert data["runs"]["isolated"]["metadata"]["mode"] == "isolated"
    assert data["details"] == {"file": "details.json.gz", "tensors": 21, "isolated_tensors": 21}
    loaded = load_summary(tmp_path / "out" / "summary.json")
    assert len(loaded["tensors"]) == 21 and loaded["tensors"][0]["order"] == 0
    assert json.loads(summary_json_text(loaded)) == json.loads(summary_json_text(summary))  # nothing lost on disk
    row = data["first_divergence"]
    assert row["block"] == "unet_block_1_down" and row["step"] == 0 and row["status"] == "fail"
    assert row["metrics"]["max_abs"] == pytest.approx(0.5)
    assert row["threshold"]["mode"] == "normwise" and row["threshold"]["passed"] is False
    assert data["culprits"][0]["block"] == "unet_block_1_down"
    # an infinite metric is written as a string, keeping the file standard JSON
    z = compare_runs(zero, zero_c)
    zsum = build_summary(z, make_verdict(z))
    render_outputs(zsum, tmp_path / "zout")
    zdata = load_summary(tmp_path / "zout" / "summary.json")
    assert zdata["tensors"][0]["metrics"]["rel_l2"] == "Infinity"

    # junit: the verdict, then one testcase per block over all steps; the bug reads as one block failure
    suites = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    main = suites.find("testsuite[@name='parity']")
    cases = main.findall("testcase")
    assert [c.get("name") for c in cases] == ["verdict"] + list(dict.fromkeys(b["id"] for b in data["blocks"]))
    assert cases[0].find("failure").get("message") == data["verdict"]["text"]
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["verdict", "unet_block_1_down"]
    message = failed[1].find("failure").get("message")
    assert "unet/step_000/down_blocks.1.resnets.0" in message and "rtol 0.0001" in message
    assert "max_abs 0.5" in message and "in isolation" in message
    assert main.get("failures") == "2" and main.get("tests") == str(len(cases))

    table = format_table(summary)
    assert "DIVERGENCE" in table and "unet/step_000/down_blocks.1.resnets.0" in table
    assert "culprit in isolation: unet_block_1_down" in table


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_exit_codes(tmp_path, capsys):
    ref = write_run(tmp_path / "r.h5", unet_run())
    same = write_run(tmp_path / "s.h5", unet_run())
    bad = write_run(tmp_path / "b.h5", unet_run(offset={(1, 2): 1.0}))
    out = tmp_path / "out"
    assert cli_main(["compare", str(ref), str(same), "--output-dir", str(out)]) == 0
    assert "PARITY" in capsys.readouterr().out
    assert (out / "summary.json").is_file() and (out / "junit.xml").is_file()
    assert cli_main(["compare", str(ref), str(bad), "--output-dir", str(out)]) == 1
    assert "first divergence at unet/step_001/down_blocks.2.resnets.0" in capsys.readouterr().out
    iso = write_run(tmp_path / "iso.h5", unet_run(offset={(1, 2): 1.0}), mode="isolated")
    assert cli_main(["compare", str(ref), str(bad), "--isolated", str(iso), "--output-dir", str(out)]) == 1
    assert "is a culprit in isolation" in capsys.readouterr().out

    # bad input: exit 2 with a message
    assert cli_main(["compare", str(tmp_path / "nope.h5"), str(same), "--output-dir", str(out)]) == 2
    not_a_run = tmp_path / "junk.h5"
    not_a_run.write_bytes(b"not hdf5")
    assert cli_main(["compare", str(ref), str(not_a_run), "--output-dir", str(out)]) == 2
    config = tmp_path / "parity.toml"
    config.write_text('[[overrides]]\npattern = "*"\nrtol = 1\n')
    assert cli_main(["compare", str(ref), str(same), "--config", str(config), "--output-dir", str(out)]) == 2
    assert "reason" in capsys.readouterr().err
    names = tmp_path / "names.toml"
    names.write_text("[[rule]]\nregex = '('\nto = 'x'\n")
    assert cli_main(["compare", str(ref), str(same), "--map", str(names), "--output-dir", str(out)]) == 2
    assert "bad regular expression" in capsys.readouterr().err
    assert cli_main(["compare", str(ref), str(same), "--isolated", str(same), "--output-dir", str(out)]) == 2
    assert "free-mode run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# streaming


def test_compare_reads_one_tensor_per_file_at_a_time_within_a_tiny_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "DEFAULT_BUDGET", 0)  # every pair is over budget: each is measured alone
    rng = np.random.default_rng(0)
    tensors = {("unet", "step_000", f"down_blocks.{i}"): rng.standard_normal(20_000).astype(np.float32)
               for i in range(6)}
    ref = write_run(tmp_path / "r.h5", tensors)
    cand = write_run(tmp_path / "c.h5", tensors)
    alive: list[weakref.ref] = []
    most_alive = 0
    original = RunReader.read

    def tracking_read(self, key):
        nonlocal most_alive
        live = [w for w in alive if w() is not None]
        most_alive = max(most_alive, len(live))
        array = original(self, key)
        alive.append(weakref.ref(array))
        return array

    monkeypatch.setattr(RunReader, "read", tracking_read)
    comparison = compare_runs(ref, cand)
    assert comparison.coverage.counts["pass"] == 6
    assert len(alive) == 12  # every tensor read exactly once
    assert most_alive <= 1  # when a tensor is read, at most the other file's current tensor is held


@pytest.mark.parametrize("pairs_in_budget", [0, 2])
def test_peak_memory_is_the_read_ahead_budget_or_two_tensors(tmp_path, monkeypatch, pairs_in_budget):
    monkeypatch.setattr(compare_module, "tensor_metrics",
                        lambda *a, **k: tensor_metrics(*a, **{**k, "threads": 1}))
    n = 2_000_000  # 8 MB per tensor
    monkeypatch.setattr(pool, "DEFAULT_BUDGET", pairs_in_budget * 2 * n * 4)
    rng = np.random.default_rng(0)
    tensors = {("unet", "step_000", f"down_blocks.{i}"): rng.standard_normal(n).astype(np.float32)
               for i in range(4)}
    ref = write_run(tmp_path / "r.h5", tensors)
    cand = write_run(tmp_path / "c.h5", {k: v + np.float32(1e-6) for k, v in tensors.items()})
    del tensors
    tracemalloc.start()
    try:
        comparison = compare_runs(ref, cand)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert comparison.coverage.counts["pass"] + comparison.coverage.counts["fail"] == 4
    tensor_bytes = n * 4
    in_flight = max(2, 2 * pairs_in_budget) * tensor_bytes  # the budget, or one pair when it holds none
    workers = pool.default_workers()
    assert peak < in_flight + workers * 6 * 2 ** 20, peak  # + a few MiB of scratch per worker, not 8 tensors
    assert math.isfinite(comparison.results[0].metrics.rel_l2)


def test_uint8_images_may_be_one_level_off_in_a_thousandth_of_pixels():
    from sd_parity.judging.metrics import exact_metrics
    from sd_parity.judging.tolerances import Tolerances, judge

    reference = np.zeros((1, 100, 100, 3), np.uint8)
    rule = Tolerances().rule_for("pipeline", "main", "image_uint8", "uint8")
    candidate = reference.copy()
    candidate.flat[:30] = 1  # 0.1% of 30,000 pixels, one level off
    assert judge(exact_metrics(reference, candidate), rule).passed
    candidate.flat[:31] = 1
    assert not judge(exact_metrics(reference, candidate), rule).passed
    candidate = reference.copy()
    candidate.flat[0] = 2
    assert not judge(exact_metrics(reference, candidate), rule).passed


def test_uint8_images_calibrate_on_the_reference_distance_from_the_oracle():
    from sd_parity.judging.metrics import exact_metrics
    from sd_parity.judging.tolerances import Tolerances, judge

    oracle = np.full((1, 50, 50, 3), 100, np.uint8)
    reference = oracle.copy()
    reference.flat[:600] = 104  # a half-precision reference: 4 levels off in 8% of the pixels
    rule = Tolerances().rule_for("pipeline", "main", "image_uint8", "float16")
    rule = type(rule)(**{**rule.__dict__, "dtype": "uint8", "k": 3.0})
    candidate = oracle.copy()
    candidate.flat[:1500] = 110  # 10 levels (<= 3 * 4) in 20% (<= 3 * 8%) of the pixels
    metrics = exact_metrics(reference, candidate)
    assert judge(metrics, rule, ref_vs_oracle=exact_metrics(oracle, reference),
                 cand_vs_oracle=exact_metrics(oracle, candidate)).passed
    assert not judge(metrics, rule).passed  # without the oracle: the fixed one-level rule
    candidate.flat[:1500] = 113  # 13 levels > 3 * 4
    assert not judge(exact_metrics(reference, candidate), rule, ref_vs_oracle=exact_metrics(oracle, reference),
                     cand_vs_oracle=exact_metrics(oracle, candidate)).passed
