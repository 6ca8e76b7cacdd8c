"""Mismatches that explain themselves: each common porting mistake, made on purpose in a crafted pair,
is named by the diagnosis (and a genuinely wrong tensor is not explained away)."""
import json

import numpy as np
import pytest

from sd_parity.cli import main as cli_main
from sd_parity.judging.compare import compare_runs
from sd_parity.judging.diagnosis import explain
from sd_parity.judging.verdict import make_verdict
from sd_parity.reports.html.columns import _reason
from sd_parity.reports.summary import build_summary, format_table, load_summary
from sd_parity.runs.hdf5 import RunWriter

META = {"impl": "test", "prompt": "a red cube", "seed": 0, "steps": 3, "mode": "free", "guidance": 7.5}
RNG = np.random.default_rng(3)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def write_run(path, tensors, **meta):
    with RunWriter(path, {**META, **meta}) as writer:
        for (component, invocation, name), array in tensors.items():
            writer.write(component, invocation, name, array)
    return path


def kinds(found):
    return [d.kind for d in found]


# ---------------------------------------------------------------------------------------------------
# one crafted pair per mistake


def test_cfg_batch_halves_swapped():
    ref = rand(2, 4, 8, 8)
    found = explain(ref, ref[::-1].copy(), key="unet/step_000/conv_in", guided=True)
    assert kinds(found) == ["batch_order"] and found[0].fix == "batch = [1, 0]"
    assert "classifier-free-guidance batch is [cond, uncond]" in found[0].text


def test_batch_items_permuted():
    ref = rand(3, 16)
    found = explain(ref, ref[[2, 0, 1]], key="text_encoder/call_0/x")
    assert kinds(found) == ["batch_order"] and found[0].fix == "batch = [2, 0, 1]"


def test_vae_scaling_factor_applied_twice():
    ref = rand(1, 4, 8, 8)
    found = explain(ref, ref / np.float32(0.18215))
    assert kinds(found) == ["scale"]
    assert found[0].text.startswith("candidate = reference x 5.49") and "1/0.18215" in found[0].text


def test_image_in_minus_one_to_one():
    ref = RNG.uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    found = explain(ref, 2 * ref - 1)
    assert kinds(found) == ["affine"] and "x 2 - 1" in found[0].text and "[-1, 1]" in found[0].text


@pytest.mark.parametrize("stored, fix, text", [
    (lambda a: a.transpose(0, 2, 3, 1), 'layout = "nhwc"', "channels-last"),
    (lambda a: a.transpose(0, 2, 3, 1).reshape(2, 30, 3), 'layout = "tokens"', "tokens vs feature map"),
    (lambda a: a.reshape(2, 3, 30), 'layout = "reshape"', "same elements in the same order"),
])
def test_layouts_with_another_shape(stored, fix, text):
    ref = rand(2, 3, 5, 6)
    found = explain(ref, np.ascontiguousarray(stored(ref)))
    assert kinds(found) == ["layout"] and found[0].fix == fix and text in found[0].text


def test_channels_last_and_batch_order_together():
    ref = rand(2, 3, 5, 6)
    found = explain(ref, ref[::-1].transpose(0, 2, 3, 1).copy(), key="unet/step_001/h", guided=True)
    assert kinds(found) == ["layout", "batch_order"] and found[0].fix == 'layout = "nhwc", batch = [1, 0]'


def test_height_and_width_swapped_with_the_same_shape():
    ref = rand(1, 3, 6, 6)
    found = explain(ref, ref.transpose(0, 1, 3, 2).copy())
    assert kinds(found) == ["layout"] and "transposed by [0, 1, 3, 2]" in found[0].text


def test_channels_last_data_written_under_an_nchw_shape():
    ref = rand(1, 3, 4, 5)
    found = explain(ref, ref.transpose(0, 2, 3, 1).copy().reshape(1, 3, 4, 5))
    assert kinds(found) == ["layout"] and "buffer holds (N, H, W, C)" in found[0].text


def test_time_embedding_at_batch_one_is_broadcast_equivalent():
    temb = rand(1, 32)
    found = explain(np.concatenate([temb, temb]), temb)
    assert kinds(found) == ["broadcast"] and found[0].fix == "broadcast = true"
    assert kinds(explain(np.concatenate([temb, rand(1, 32)]), temb)) == []  # the halves differ: not equivalent


def test_one_part_of_a_fused_tensor():
    q, k, v = rand(2, 5, 4), rand(2, 5, 4), rand(2, 5, 4)
    found = explain(k, np.concatenate([q, k, v], axis=-1))
    assert kinds(found) == ["fused"] and "part 2" in found[0].text


def test_timestep_off_by_one():
    found = explain(np.array([751.0], np.float32), np.array([750.0], np.float32), key="pipeline/step_000/timestep")
    assert kinds(found) == ["timestep_offset"] and "off by -1" in found[0].text


def test_image_truncated_instead_of_rounded():
    image = RNG.uniform(0, 1, (1, 16, 16, 3))
    found = explain((image * 255).round().astype(np.uint8), (image * 255).astype(np.uint8))
    assert kinds(found) == ["uint8_truncation"] and "one level low" in found[0].text and "never high" in found[0].text


def test_a_wrong_tensor_is_not_explained_away():
    ref = rand(2, 3, 5, 6)
    assert explain(ref, rand(2, 3, 5, 6), key="unet/step_000/x", guided=True) == []
    assert explain(ref, ref + 0.3 * rand(2, 3, 5, 6)) == []  # close-ish, but no known mistake makes it match


# ---------------------------------------------------------------------------------------------------
# in a comparison: rows, summary.json, verdict, table and report


def test_step_offset_found_against_the_neighbouring_step(tmp_path):
    latents = [rand(1, 4, 8, 8) for _ in range(3)]
    ref = write_run(tmp_path / "r.h5", {("pipeline", f"step_{i:03d}", "latents"): latents[i] for i in range(3)})
    lagging = write_run(tmp_path / "c.h5", {("pipeline", f"step_{i:03d}", "latents"): latents[max(i - 1, 0)]
                                            for i in range(3)})
    comparison = compare_runs(ref, lagging)
    rows = {r.key: r for r in comparison.results}
    found = rows["pipeline/step_002/latents"].diagnoses
    assert [d.kind for d in found] == ["step_offset"] and "equals the reference's step_001" in found[0].text


def test_diagnosis_reaches_summary_verdict_table_and_report(tmp_path):
    h, q, k, v = rand(2, 4, 8, 8), rand(2, 5, 4), rand(2, 5, 4), rand(2, 5, 4)
    ref = write_run(tmp_path / "r.h5", {("unet", "step_000", "conv_in"): h,
                                        ("unet", "step_000", "attn1.to_q"): q, ("unet", "step_000", "attn1.to_k"): k,
                                        ("unet", "step_000", "attn1.to_v"): v})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "conv_in"): h[::-1].copy(),
                                         ("unet", "step_000", "attn1.to_qkv"): np.concatenate([q, k, v], -1)})
    out = tmp_path / "out"
    assert cli_main(["compare", str(ref), str(cand), "--output-dir", str(out)]) == 1
    summary = load_summary(out / "summary.json")
    by_kind = {k["kind"]: k for k in summary["diagnosis"]["kinds"]}
    assert by_kind["batch_order"]["fix"] == "[[transform]] glob = 'unet/**' batch = [1, 0]"
    assert by_kind["fused"]["tensors"] == 4  # the fused tensor and its three parts
    assert by_kind["fused"]["fix"] == ("[[split]] glob = 'unet/*/**.to_qkv' into = ['unet/\\1/\\2.to_q', "
                                       "'unet/\\1/\\2.to_k', 'unet/\\1/\\2.to_v'] axis = -1")
    assert "diagnosis: batch halves swapped" in summary["verdict"]["text"]
    row = next(r for r in summary["tensors"] if r["key"] == "unet/step_000/conv_in")
    assert row["diagnoses"][0]["kind"] == "batch_order" and "diagnosis: batch halves swapped" in _reason(row)
    assert "diagnosis: batch halves swapped" in (out / "report.html").read_text()
    table = format_table(build_summary(compare_runs(ref, cand), make_verdict(compare_runs(ref, cand))))
    assert "fix: [[transform]] glob = 'unet/**' batch = [1, 0]" in table
