"""The HTML report: what it shows, re-rendering from summary.json, escaping, size, the index.

Most tests build a small fake SD capture with RunWriter (fast, no model); one runs tiny-sd1 with a
fault injected into impl's GroupNorm to check the report points at the faulted module.
"""
import gzip
import json
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from sd_parity.cli import main as cli_main
from sd_parity.judging.compare import compare_runs
from sd_parity.reports.html import REPORT_FILE, write_index_html, write_report
from sd_parity.reports.html.decimate import keep_extremes
from sd_parity.reports.html.depth import POINTS_PER_CHART
from sd_parity.reports.html.drilldown import HISTOGRAM_BINS, MAP_SIDE, WORST_ELEMENTS, add_drilldowns, tensor_detail
from sd_parity.reports.html.pictures import amplified_difference, png_data_uri
from sd_parity.reports.html.render import REPORT_SCRIPTS, inline_asset, render_report, script_json
from sd_parity.runs.hdf5 import RunWriter
from sd_parity.reports.html.overview import next_steps
from sd_parity.reports.junit import junit_text
from sd_parity.reports.summary import DETAILS_FILE, SCHEMA_VERSION, build_summary, load_summary, render_outputs
from sd_parity.judging.verdict import make_verdict

FAULTED = "down_blocks.1.resnets.0.norm1"
SPIKE = (1, 3, 2, 1)  # the element of FAULTED the fake fault changes
PAYLOADS = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')
META = {"model": "fake-sd", "prompt": "a red cube", "seed": 0, "steps": 3, "scheduler": "ddim", "dtype": "fp32",
        "height": 16, "width": 16, "versions": {"numpy": np.__version__}}


# ---------------------------------------------------------------------------------------------------
# a fake capture


def fake_capture(steps=3, fault_name=FAULTED):
    """{role: {(component, invocation, name): array}} for the reference, a free-running candidate
    with a fault in `fault_name` at SPIKE (carried downstream as small errors), and an isolated-mode
    candidate in which only the faulted block is wrong."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    ref = {("pipeline", "main", "x_T"): f32(1, 4, 8, 8),
           ("text_encoder", "call_0", "@input_ids"): np.arange(77, dtype=np.int64)[None],
           ("text_encoder", "call_0", "encoder.layers.0"): f32(1, 77, 32)}
    downstream = []
    for step in range(steps):
        inv = f"step_{step:03d}"
        ref[("pipeline", inv, "latent_model_input")] = f32(2, 4, 8, 8)
        for name, shape in (("down_blocks.0@hidden_states", (2, 4, 8, 8)), ("down_blocks.0.resnets.0", (2, 8, 8, 8)),
                            ("down_blocks.0", (2, 8, 8, 8)), ("down_blocks.1@hidden_states", (2, 8, 8, 8)),
                            (fault_name, (2, 8, 8, 8)), ("down_blocks.1", (2, 8, 4, 4)), ("mid_block", (2, 8, 4, 4)),
                            ("conv_out", (2, 4, 8, 8))):
            ref[("unet", inv, name)] = f32(*shape)
        ref[("pipeline", inv, "latents")] = f32(1, 4, 8, 8)
        downstream += [("unet", inv, "down_blocks.1"), ("unet", inv, "mid_block"), ("unet", inv, "conv_out"),
                       ("pipeline", inv, "latents")]
    ref[("vae_decoder", "call_0", "decoder.up_blocks.0")] = f32(1, 8, 16, 16)
    image = rng.random((1, 16, 16, 3), dtype=np.float32)
    ref[("pipeline", "main", "image")] = image
    ref[("pipeline", "main", "image_uint8")] = np.round(image * 255).astype(np.uint8)

    free, isolated = dict(ref), dict(ref)
    for step in range(steps):
        inv = f"step_{step:03d}"
        spiked = ref[("unet", inv, fault_name)].copy()
        spiked[SPIKE] += 1.0
        free[("unet", inv, fault_name)] = isolated[("unet", inv, fault_name)] = spiked
        isolated[("unet", inv, "down_blocks.1")] = ref[("unet", inv, "down_blocks.1")] + 1e-2
    for key in downstream + [("vae_decoder", "call_0", "decoder.up_blocks.0"), ("pipeline", "main", "image")]:
        free[key] = (ref[key] * (1 + 1e-3 * rng.standard_normal(ref[key].shape))).astype(np.float32)
    pixels = ref[("pipeline", "main", "image_uint8")].copy()
    pixels[0, 4, 5, 0] ^= 1  # one pixel one level off
    free[("pipeline", "main", "image_uint8")] = pixels
    return {"reference": ref, "free": free, "isolated": isolated}


def write_runs(folder: Path, capture, **meta):
    paths = {}
    for role, tensors in capture.items():
        paths[role] = folder / f"{role}.h5"
        mode = "isolated" if role == "isolated" else "free"
        with RunWriter(paths[role], {**META, **meta, "impl": role, "mode": mode}) as writer:
            for (component, invocation, name), array in tensors.items():
                writer.write(component, invocation, name, array)
    return paths


def summarize(paths):
    comparison, isolated = compare_runs(paths["reference"], paths["free"]), compare_runs(paths["reference"],
                                                                                          paths["isolated"])
    return build_summary(comparison, make_verdict(comparison, isolated), isolated)


@pytest.fixture
def fake_case(tmp_path):
    """(summary with drill-downs, the case folder with summary.json, junit.xml and report.html)."""
    summary = add_drilldowns(summarize(write_runs(tmp_path, fake_capture())))
    render_outputs(summary, tmp_path / "case")
    return summary, tmp_path / "case"


def sections(html: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)"', html)


# ---------------------------------------------------------------------------------------------------
# what the report shows


def test_the_first_divergence_and_its_culprit_lead_the_page(fake_case):
    summary, folder = fake_case
    html = (folder / REPORT_FILE).read_text()
    first_key = f"unet/step_000/{FAULTED}"
    assert summary["first_divergence"]["key"] == first_key
    assert [c["block"] for c in summary["culprits"]] == ["unet_block_1_down"]
    assert sections(html) == ["summary", "images", "depth", "heatmap", "drilldowns", "tensors"]
    top = html[:html.index('<section id="images"')]
    assert "DIVERGENCE" in top and f"{first_key} (block unet_block_1_down)" in top
    assert top.index("DIVERGENCE") < top.index('id="first-divergence"') < top.index('id="culprits"')
    # its drill-down is linked from the top and opens first
    assert f'href="#dd-free-{summary["first_divergence"]["index"]}"' in top
    assert re.search(rf'<details class="card drill" id="dd-free-{summary["first_divergence"]["index"]}"[^>]* open>',
                     html)
    # run facts, coverage and copy-paste commands: the candidate is not ours, so its test is an assert_parity
    for text in ("fake-sd", "a red cube", "ddim", "fp32", str(folder.parent / "reference.h5"),
                 f"parity compare {folder.parent / 'reference.h5'} {folder.parent / 'free.h5'} --isolated "
                 f"{folder.parent / 'isolated.h5'}",
                 "sd_parity.assert_parity(&#39;", "only=&#39;unet_block_1_down&#39;", "No coverage gaps"):
        assert text in top, text
    assert "pytest -k" not in top and "DIR" not in top  # no block tests of our impl, no placeholders
    # next steps follow from the verdict: the culprit block first, then the first divergence
    steps = top[top.index('id="next-steps"'):top.index('id="repro"')]
    assert steps.index("Look at block unet_block_1_down") < steps.index("Look at the first divergence")
    assert f'href="#dd-isolated-{summary["culprits"][0]["worst"]["index"]}"' in steps
    assert 'id="depth-charts"' in html and 'id="heatmaps"' in html and 'id="tensor-table"' in html


def test_drilldowns_locate_the_fault_from_the_tensor_data(fake_case):
    summary, _ = fake_case
    drill = summary["drilldowns"]
    assert drill["unavailable"] == []
    first = drill["tensors"][0]
    assert first["key"] == summary["first_divergence"]["key"] and first["why"].startswith("first divergence")
    assert first["worst"][0]["index"] == list(SPIKE) and first["worst"][0]["abs_diff"] == pytest.approx(1.0)
    assert len(first["worst"]) == WORST_ELEMENTS
    spatial = first["spatial"]
    assert (spatial["batch"], spatial["rows"], spatial["cols"]) == (SPIKE[0], 8, 8)
    hottest = int(np.argmax([float(v) for v in spatial["values"]]))
    assert divmod(hottest, spatial["cols"]) == SPIKE[2:]
    assert np.argmax(first["channels"]["mean_abs"]) == SPIKE[1]
    assert len(first["histogram"]["counts"]) == HISTOGRAM_BINS and sum(first["histogram"]["counts"]) == 1
    assert first["histogram"]["zeros"] == 2 * 8 * 8 * 8 - 1
    assert {d["source"] for d in drill["tensors"]} == {"free", "isolated"}
    assert len([d for d in drill["tensors"] if d["source"] == "free"]) <= 1 + drill["top_n"]
    # images and latents
    assert drill["images"]["max_levels"] == 1 and drill["images"]["differing_pixels"] == 1
    assert drill["images"]["level_counts"] == [16 * 16 - 1, 1]  # pixels per level of difference
    assert drill["images"]["difference_true"].startswith("data:image/png;base64,")
    assert drill["images"]["reference"].startswith("data:image/png;base64,")
    assert [latent["step"] for latent in drill["latents"]] == [0, 1, 2]


def test_large_tensors_are_pooled_to_small_maps():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((1, 3, 300, 200)).astype(np.float32)
    cand = ref.copy()
    cand[0, 1, 299, 7] = np.nan  # a NaN on one side only is the worst element
    detail = tensor_detail(ref, cand, "NCHW")
    spatial = detail["spatial"]
    assert spatial["rows"] <= MAP_SIDE and spatial["cols"] <= MAP_SIDE and spatial["pool"] == [5, 4]
    assert spatial["values"][(299 // 5) * spatial["cols"] + 7 // 4] == "Infinity"
    assert detail["worst"][0]["index"] == [0, 1, 299, 7] and detail["histogram"]["nonfinite"] == 1
    nhwc = tensor_detail(ref.transpose(0, 2, 3, 1), cand.transpose(0, 2, 3, 1), "NHWC")
    assert nhwc["spatial"]["values"] == spatial["values"] and nhwc["channels"]["count"] == 3


def test_rerendering_needs_only_the_summary(fake_case, capsys):
    summary, folder = fake_case
    for run in folder.parent.glob("*.h5"):
        run.unlink()
    again = folder / "again.html"
    assert cli_main(["report", str(folder / "summary.json"), "--output", str(again)]) == 0
    assert capsys.readouterr().out.strip() == again.resolve().as_uri()
    assert again.read_text() == (folder / REPORT_FILE).read_text()


def test_summary_json_is_small_and_the_details_file_travels_with_it(fake_case, capsys):
    summary, folder = fake_case
    head = json.loads((folder / "summary.json").read_text())
    assert "tensors" not in head and "drilldowns" not in head and head["details"]["file"] == DETAILS_FILE
    assert (folder / "summary.json").stat().st_size < (folder / DETAILS_FILE).stat().st_size
    moved = folder.parent / "moved"
    moved.mkdir()
    (folder / "summary.json").rename(moved / "summary.json")
    assert cli_main(["report", str(moved / "summary.json")]) == 2
    assert f"{moved / DETAILS_FILE} is missing" in capsys.readouterr().err
    assert not (moved / REPORT_FILE).exists()


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("{not json", "not readable JSON"), ('{"schema_version": 99}', "schema version 2"),
    ('{"schema_version": 2, "tensors": []}', "lacks verdict")])
def test_report_command_rejects_bad_summaries(tmp_path, capsys, content, message):
    path = tmp_path / "summary.json"
    if content is not None:
        path.write_text(content)
    assert cli_main(["report", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / REPORT_FILE).exists()


def test_a_summary_without_drilldowns_still_renders(tmp_path):
    summary = summarize(write_runs(tmp_path, fake_capture(steps=1)))
    html = render_report(summary)
    assert "has no drill-down data" in html and summary["first_divergence"]["key"] in html


# ---------------------------------------------------------------------------------------------------
# escaping


def malicious_case(folder: Path) -> dict:
    """A summary whose tensor names, block ids, prompt and warnings carry markup (run-file names
    cannot hold '/', so the `</script>` payload is put into the summary afterwards)."""
    paths = write_runs(folder, fake_capture(steps=1, fault_name=PAYLOADS[1]), prompt=" ".join(PAYLOADS),
                       negative_prompt=PAYLOADS[1], versions={PAYLOADS[0]: PAYLOADS[1]})
    summary = add_drilldowns(summarize(paths))
    row = summary["tensors"][summary["first_divergence"]["index"]]
    assert row["name"] == PAYLOADS[1]
    summary["tensors"][0].update(name=PAYLOADS[0], key="pipeline/main/" + PAYLOADS[0])
    summary["warnings"].append(PAYLOADS[0])
    summary["culprits"][0]["block"] = PAYLOADS[0]
    return summary


def test_markup_from_run_files_renders_inert(tmp_path):
    html = render_report(malicious_case(tmp_path))
    for payload in PAYLOADS:
        assert payload not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img src=x" not in html and "alert(1)</script>" not in html
    assert html.count("<script") == 1 + len(REPORT_SCRIPTS) and html.count("</script>") == 1 + len(REPORT_SCRIPTS)
    data = html[html.index('id="report-data">'):]
    data = data[len('id="report-data">'):data.index("</script>")]
    assert PAYLOADS[0] in json.dumps(json.loads(data))  # the data still holds the name, escaped for <script>


def test_script_json_cannot_close_its_element():
    value = {"name": "</script><script>alert(1)</script>", "line": "a\u2028b\u2029c", "amp": "&lt;", "x": 1.5}
    text = str(script_json(value))
    for raw in ("<", ">", "&", "\u2028", "\u2029"):
        assert raw not in text
    assert json.loads(text) == value


def test_inlined_assets_fetch_nothing():
    for name in (*REPORT_SCRIPTS, "report.css"):
        text = str(inline_asset(name))
        assert "sourceMappingURL" not in text and "</script" not in text.lower()
    html = render_report(build_summary_for_size(steps=1, per_step=20))
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "default-src 'none'" in html


# ---------------------------------------------------------------------------------------------------
# size


def test_decimation_keeps_every_buckets_extremes():
    rng = np.random.default_rng(2)
    values = rng.standard_normal(50_000).tolist()
    values[12_345], values[40_000] = 100.0, -100.0
    other = rng.standard_normal(50_000).tolist()
    kept = keep_extremes([values, other], cap=1000, always=[7])
    assert len(kept) <= 1000 and kept == sorted(set(kept))
    assert {12_345, 40_000, 7, int(np.argmax(other)), int(np.argmin(other))} <= set(kept)
    assert keep_extremes([[1.0, None, 3.0]], cap=10) == [0, 1, 2]


def build_summary_for_size(steps=50, per_step=700, isolated=True):
    """A synthetic summary shaped like a full sd15-arch capture: per_step tensors per UNet step with
    real module names, metrics and thresholds, one failing block, drill-downs with 64x64 maps."""
    blocks = [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]
    leaves = ["attentions.0.transformer_blocks.0.attn2.to_out.0", "resnets.1.conv2", "attentions.1.norm",
              "resnets.0.time_emb_proj"]
    rows = []
    for step in range(steps):
        for k in range(per_step):
            block = blocks[k * len(blocks) // per_step]
            group = ("unet_block_mid" if block == "mid_block"
                     else f"unet_block_{block.split('.')[1]}_{'down' if block.startswith('down') else 'up'}")
            ratio = 3.0 if block == "up_blocks.1" and step >= steps // 5 else 0.01 + (k % 17) / 20
            rows.append(_row(len(rows), step, f"{block}.{leaves[k % len(leaves)]}#{k}", block, group, ratio))
    first = dict(next(r for r in rows if r["status"] == "fail"), location="somewhere")
    ref = np.random.default_rng(3).standard_normal((1, 4, 64, 64)).astype(np.float32)
    detail = tensor_detail(ref, ref * 1.001, "NCHW")
    image = np.tile(np.linspace(0, 255, 512, dtype=np.uint8)[:, None, None], (1, 512, 3))
    summary = {
        "schema_version": 1, "created": "2025-01-01T00:00:00+00:00",
        "verdict": {"status": "divergence", "text": "first divergence at somewhere", "exit_code": 1},
        "first_divergence": first, "culprits": [], "isolated_failures_outside_blocks": [],
        "runs": {role: {"path": f"/runs/{role}.h5", "name": f"{role}.h5", "metadata": META, "tensors": len(rows),
                        "bytes": 1} for role in ("reference", "candidate")} | {"oracle": None, "isolated": None},
        "mode": {"candidate": "free", "calibrated": False, "isolated_given": isolated},
        "config": {"source": None}, "warnings": [],
        "coverage": {"ref_tensors": len(rows), "cand_tensors": len(rows), "compared": len(rows),
                     "counts": {"pass": 0, "fail": 0, "missing": 0, "extra": 0, "shape_mismatch": 0, "skipped": 0},
                     **{key: [] for key in ("missing", "extra", "shape_mismatch", "skipped", "dtype_differences",
                                            "missing_invocations", "extra_invocations", "unmatched_names")}},
        "blocks": [], "tensors": rows, "isolated": None,
        "drilldowns": {"top_n": 8, "unavailable": [], "latents": [],
                       "images": {"key": "pipeline/main/image_uint8", "batch": 1, "height": 512, "width": 512,
                                  "reference": png_data_uri(image), "candidate": png_data_uri(image),
                                  "difference": png_data_uri(amplified_difference(image, image)[0]),
                                  "max_levels": 0, "amplification": 1, "differing_pixels": 0, "pixels": 512 * 512},
                       "tensors": [{"source": "free", "index": i, "key": rows[i]["key"], "why": "worst", **detail}
                                   for i in range(0, len(rows), len(rows) // 9)][:9]},
    }
    if isolated:
        summary["isolated"] = {"warnings": [], "tensors": [dict(r, status="pass", ratio=r["ratio"] / 10) for r in rows]}
    return summary


def _row(index, step, name, block, group, ratio):
    failed = ratio > 1
    metrics = {"kind": "float", "numel": 655360, "finite": 655360, "max_abs": 1.2e-5 * ratio, "mean_abs": 3e-7,
               "max_rel": 0.03 * ratio, "rel_l2": 4.1e-7 * ratio, "sqnr_db": 127.7, "ulp_max": 2048,
               "cosine_distance": 1.1e-13, "ref_l2": 812.5, "ulp_mean": 3.2, "ulp_p99": 40, "nonfinite_mismatch": 0,
               "allclose_violations": 2000 if failed else 0}
    threshold = {"passed": not failed, "ratio": ratio, "mode": "allclose_quantile",
                 "settings": {"dtype": "float32", "rtol": 1.3e-6, "atol": 1e-5, "quantile": 0.999,
                              "outlier_factor": 10.0, "allowed_violations": 655.36, "violations": 0,
                              "outlier_limit": 1.2e-3},
                 "reason": "quantile: 2000 > 655" if failed else "within tolerance"}
    return {"index": index, "order": index, "cand_order": index, "key": f"unet/step_{step:03d}/{name}",
            "cand_key": f"unet/step_{step:03d}/{name}", "component": "unet", "invocation": f"step_{step:03d}",
            "step": step, "name": name, "module": name, "kind": "output", "block": group, "block_path": block,
            "group": group, "status": "fail" if failed else "pass", "ref_dtype": "float32", "cand_dtype": "float32",
            "ref_shape": [2, 320, 64, 64], "cand_shape": [2, 320, 64, 64], "ratio": ratio, "metrics": metrics,
            "threshold": threshold, "notes": []}


def test_a_full_size_capture_stays_within_budget(tmp_path):
    summary = build_summary_for_size()
    assert len(summary["tensors"]) == 35_000
    started = time.perf_counter()
    path = write_report(summary, tmp_path / REPORT_FILE)
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    print(f"35,000-row report (+ isolated): {size / 1e6:.1f} MB in {seconds:.1f} s")
    assert size < 25_000_000
    html = path.read_text()
    data = json.loads(html[html.index('id="report-data">') + len('id="report-data">'):html.index("</script>")])
    for chart in data["depth"]:
        assert len(chart["free"]) + len(chart["isolated"]) <= POINTS_PER_CHART
        assert summary["first_divergence"]["index"] in chart["free"]
    assert data["tables"]["free"]["count"] == 35_000
    assert len(data["heatmap"]["steps"]) == 50 and len(data["heatmap"]["rows"]) == 9


# ---------------------------------------------------------------------------------------------------
# the index


def test_index_links_each_case_and_leads_with_the_suite_verdict(tmp_path):
    cases = []
    for name, status in (("txt2img-ddim-numpy-fp32", "divergence"), ('bad"><img src=x onerror=alert(1)>', "parity")):
        cases.append({"name": name, "status": status, "passed": status == "parity", "verdict": f"{status}: text",
                      "first_divergence": None,
                      "culprits": [{"block": "unet_block_1_down"}] if status == "divergence" else [],
                      "candidate": "numpy", "dtype": "fp32", "scheduler": "ddim", "pipeline": "txt2img", "mode": "both",
                      "calibrated": True, "seconds": 1.5, "summary": str(tmp_path / "cases" / "x" / "summary.json"),
                      "report": str(tmp_path / "cases" / name / REPORT_FILE), "repro": f"parity run --label {name}"})
    index = {"title": "parity suite (tiny-sd1)", "status": "divergence", "cases": cases}
    html = write_index_html(index, tmp_path / "parity.html").read_text()
    assert html.index("DIVERGENCE") < html.index("1 of 2 cases at parity") < html.index("<table")
    assert 'href="cases/txt2img-ddim-numpy-fp32/report.html"' in html
    assert 'href="cases/bad%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E/report.html"' in html
    assert PAYLOADS[1] not in html and "<script" not in html
    assert "parity run --label txt2img-ddim-numpy-fp32" in html


# ---------------------------------------------------------------------------------------------------
# tiny-sd1 with a real fault


def faulty_tiny_case(folder: Path, reference_run, monkeypatch, steps: int = 1) -> Path:
    """tiny-sd1 (DDIM, fp32), numpy impl with GroupNorm eps x1000 in unet FAULTED (patched in memory);
    compared free and isolated against the cached reference, drilled into and rendered to folder/case.
    One step shares its reference run with tests/test_impl_models.py."""
    import sd_parity.impl.scope as scope
    from sd_parity.candidates.impl import ImplCandidate
    from sd_parity.candidates.runner import run_free, run_isolated
    from sd_parity.runs.config import RunConfig

    original = scope.GroupNorm.__call__

    def wrong_eps(self, x):
        if self.s.path != FAULTED:
            return original(self, x)
        return self.s.tap(self.ops.group_norm(x, self.groups, self.w, self.b, self.eps * 1000))

    monkeypatch.setattr(scope.GroupNorm, "__call__", wrong_eps)
    config = RunConfig(model="tiny-sd1", steps=steps)
    reference = reference_run(steps=steps)
    free = run_free(ImplCandidate("numpy"), config, folder / "free.h5", reference=reference)
    isolated = run_isolated(ImplCandidate("numpy"), config, reference, folder / "isolated.h5")
    comparison, iso = compare_runs(reference, free), compare_runs(reference, isolated)
    summary = build_summary(comparison, make_verdict(comparison, iso), iso)
    render_outputs(add_drilldowns(summary), folder / "case")
    return folder / "case"


def test_tiny_sd1_fault_is_named_at_the_top(tmp_path, reference_run, monkeypatch):
    folder = faulty_tiny_case(tmp_path, reference_run, monkeypatch)
    summary = load_summary(folder / "summary.json")
    assert (folder / "summary.json").stat().st_size < 1_000_000  # the rows are in details.json.gz
    assert_follows_schema(folder)
    assert summary["first_divergence"]["key"] == f"unet/step_000/{FAULTED}"
    assert summary["culprits"][0]["block"] == "unet_block_1_down"
    report = folder / REPORT_FILE
    size = report.stat().st_size
    print(f"tiny-sd1 report: {size / 1e6:.2f} MB")
    assert size < 5_000_000
    html = report.read_text()
    top = html[:html.index('<section id="images"')]
    assert f"unet/step_000/{FAULTED} (block unet_block_1_down)" in top
    assert "pytest -k &#39;unet_block_1_down and numpy and fp32&#39;" in top
    drill = summary["drilldowns"]
    assert drill["tensors"][0]["key"] == f"unet/step_000/{FAULTED}" and drill["images"] and drill["latents"]


# ---------------------------------------------------------------------------------------------------
# the published schema, JUnit and next steps


SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "summary.schema.json").read_text())


def assert_follows_schema(folder: Path) -> None:
    """summary.json and details.json.gz in `folder` validate against docs/summary.schema.json."""
    jsonschema = pytest.importorskip("jsonschema")
    assert SCHEMA["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    head = json.loads((folder / "summary.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(head)
    details = json.loads(gzip.decompress((folder / DETAILS_FILE).read_bytes()))
    jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/details"}).validate(details)


def test_summaries_follow_the_published_schema(fake_case, tmp_path):
    assert_follows_schema(fake_case[1])
    jsonschema = pytest.importorskip("jsonschema")
    broken = json.loads((fake_case[1] / "summary.json").read_text())
    broken["verdict"]["exit_code"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(broken)
    paths = write_runs(tmp_path, fake_capture(steps=1))  # no isolated run, no drill-downs
    comparison = compare_runs(paths["reference"], paths["free"])
    render_outputs(build_summary(comparison, make_verdict(comparison)), tmp_path / "free-only")
    assert_follows_schema(tmp_path / "free-only")


def junit_cases_of(summary: dict) -> dict[str, ET.Element]:
    suite = ET.fromstring(junit_text(summary).encode()).find("testsuite")
    return {case.get("name"): case for case in suite.findall("testcase")}


def junit_cases(folder: Path) -> dict[str, ET.Element]:
    suite = ET.parse(folder / "junit.xml").getroot().find("testsuite")
    return {case.get("name"): case for case in suite.findall("testcase")}


def test_junit_reads_one_bug_as_one_block_failure(fake_case, tmp_path):
    summary, folder = fake_case
    cases = junit_cases(folder)
    assert list(cases)[0] == "verdict"
    assert cases["verdict"].find("failure").get("message") == summary["verdict"]["text"]
    failed = [name for name, case in cases.items() if case.find("failure") is not None]
    assert failed == ["verdict", "unet_block_1_down"]
    text = cases["unet_block_1_down"].find("failure").text
    assert f"unet/step_000/{FAULTED}" in text and "in the free-running run" in text
    inherited = cases["unet_block_mid"].find("system-out").text
    assert "none in the isolated run" in inherited and "inherited" in inherited
    # without an isolated run, the block of the first divergence fails and those after it are not judged
    paths = write_runs(tmp_path, fake_capture(steps=2))
    comparison = compare_runs(paths["reference"], paths["free"])
    render_outputs(build_summary(comparison, make_verdict(comparison)), tmp_path / "free-only")
    cases = junit_cases(tmp_path / "free-only")
    assert [n for n, c in cases.items() if c.find("failure") is not None] == ["verdict", "unet_block_1_down"]
    skipped = {n: c.find("skipped").get("message") for n, c in cases.items() if c.find("skipped") is not None}
    assert set(skipped) == {"unet_block_mid", "unet_toplevel", "pipeline", "vae_decoder_block_0_up"}
    assert all("downstream of the first divergence" in m for m in skipped.values())


def test_next_steps_follow_the_verdict(tmp_path):
    capture = fake_capture(steps=1)
    paths = write_runs(tmp_path, {"reference": capture["reference"], "free": capture["reference"]})
    same = compare_runs(paths["reference"], paths["free"])
    steps = next_steps(build_summary(same, make_verdict(same)))
    assert [s["title"] for s in steps] == ["Keep it checked"] and "bit for bit" in steps[0]["text"]
    close = {key: (value * np.float32(1 + 1e-7) if value.dtype == np.float32 else value)
             for key, value in capture["reference"].items()}
    paths = write_runs(tmp_path, {"reference": capture["reference"], "free": close})
    near = compare_runs(paths["reference"], paths["free"])
    assert [s["title"] for s in next_steps(build_summary(near, make_verdict(near)))] == ["Calibrate the thresholds"]
    # the free run at parity, but the faulted block fails when fed the reference's inputs
    paths = write_runs(tmp_path, {"reference": capture["reference"], "free": capture["reference"],
                                  "isolated": capture["isolated"]})
    same, iso = compare_runs(paths["reference"], paths["free"]), compare_runs(paths["reference"], paths["isolated"])
    summary = build_summary(same, make_verdict(same, iso), iso)
    assert summary["verdict"]["status"] == "isolation_only" and summary["verdict"]["exit_code"] == 1
    titles = [s["title"] for s in next_steps(summary)]
    assert titles[:2] == ["Look at block unet_block_1_down (unet.down_blocks.1)", "Fix what fails in isolation"]
    assert junit_cases_of(summary)["verdict"].find("failure").get("type") == "isolation_only"
    # an isolated run that fed block 1 its own inputs did not isolate it: no culprit, a step that says why
    leaky = dict(capture["isolated"])
    for key in [k for k in leaky if k[2] == "down_blocks.1@hidden_states"]:
        leaky[key] = leaky[key] + np.float32(1e-3)
    paths = write_runs(tmp_path, {**capture, "isolated": leaky})
    free, iso = compare_runs(paths["reference"], paths["free"]), compare_runs(paths["reference"], paths["isolated"])
    summary = build_summary(free, make_verdict(free, iso), iso)
    assert summary["verdict"]["not_isolated"] == ["unet_block_1_down"] and summary["culprits"] == []
    assert "Feed each block the inputs it is given" in [s["title"] for s in next_steps(summary)]
    assert junit_cases_of(summary)["unet_block_1_down"].find("skipped").get("message").startswith("not isolated")
    paths = write_runs(tmp_path, capture)
    free = compare_runs(paths["reference"], paths["free"])
    titles = [s["title"] for s in next_steps(build_summary(free, make_verdict(free)))]
    assert titles == ["Isolate the first divergence", "Look at the first divergence"]
    iso = compare_runs(paths["reference"], paths["isolated"])
    steps = next_steps(build_summary(free, make_verdict(free, iso), iso))
    assert steps[0]["title"] == "Look at block unet_block_1_down (unet.down_blocks.1)"
    assert steps[0]["href"].startswith("#dd-isolated-")
