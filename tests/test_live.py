"""Live comparison (judging/live.py): the same summary as comparing full run files, far fewer bytes written."""
import json

import numpy as np
import pytest

from sd_parity.candidates.registry import resolve
from sd_parity.candidates.runner import run_free
from sd_parity.judging.compare import compare_runs
from sd_parity.judging.live import KEEP_DIVERGENT, LiveCompare, run_live
from sd_parity.judging.verdict import make_verdict
from sd_parity.reports.summary import build_summary, load_summary
from sd_parity.runs.config import RunConfig
from sd_parity.runs.hdf5 import RunFileError, RunReader

# what differs between two comparisons of the same tensors by construction: where the files are, how long it
# took, and what was read from disk
_INCIDENTAL = {"path", "seconds", "bytes_read", "runs", "generated", "created", "timing"}


def _comparable(value):
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in _INCIDENTAL}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


@pytest.mark.parametrize("fault", [None, "groupnorm_eps"])
def test_live_summary_equals_the_summary_from_files(reference_run, tmp_path, fault):
    config = RunConfig(model="tiny-sd1", steps=3, capture="all")
    reference = reference_run(steps=3, capture="all")
    full = run_free(resolve("torch", fault=fault), config, tmp_path / "full.h5", reference=reference)
    from_files = compare_runs(reference, full)
    with run_live(resolve("torch", fault=fault), config, reference, tmp_path / "kept.h5") as live:
        from_live = compare_runs(reference, live)
        kept_bytes = sum(e.nbytes for e in RunReader(live.path).entries())
        tensor_bytes = live.tensor_bytes
    summary_files = build_summary(from_files, make_verdict(from_files))
    summary_live = build_summary(from_live, make_verdict(from_live))
    assert summary_live["verdict"] == summary_files["verdict"]
    assert [(r.key, r.status) for r in from_live.results] == [(r.key, r.status) for r in from_files.results]
    for a, b in zip(from_live.results, from_files.results):
        assert (a.metrics.to_dict() if a.metrics else None) == (b.metrics.to_dict() if b.metrics else None), a.key
        assert a.notes == b.notes, a.key
    assert json.dumps(_comparable(summary_live["tensors"]), sort_keys=True, default=str) == \
        json.dumps(_comparable(summary_files["tensors"]), sort_keys=True, default=str)
    with RunReader(full) as f:
        assert tensor_bytes == sum(e.nbytes for e in f.entries())
    assert kept_bytes < tensor_bytes / 2, (kept_bytes, tensor_bytes)
    with RunReader(live.path) as kept:
        held = {e.key for e in kept.entries()}
        assert all(k in held for k in ("pipeline/main/image", "pipeline/step_000/latents"))  # what the report draws
        divergent = [r for r in from_files.results if r.divergent]
        assert bool(divergent) == (fault is not None)
        for row in divergent[:KEEP_DIVERGENT]:  # the first divergences, with their block's inputs
            assert row.key in held
            block = row.block_id
            inputs = [r.key for r in from_files.results if r.kind == "input" and r.block_id == block
                      and r.invocation == row.invocation]
            assert all(k in held for k in inputs), (row.key, inputs)


def test_a_live_comparison_writes_nothing_half_done_and_refuses_what_a_writer_refuses(reference_run, tmp_path):
    reference = reference_run(steps=3, capture="all")
    kept = tmp_path / "kept.h5"
    with pytest.raises(RuntimeError):
        with LiveCompare(kept, {}, reference) as live:
            live.write("unet", "step_000", "conv_in", np.zeros((1, 4, 8, 8), np.float32))
            raise RuntimeError("the candidate crashed")
    assert not kept.exists()
    with LiveCompare(kept, {}, reference) as live:
        with pytest.raises(RunFileError, match="unknown component"):
            live.write("nope", "step_000", "x", np.zeros(3, np.float32))
        live.write("unet", "step_000", "conv_in", np.zeros((1, 4, 8, 8), np.float32))
        with pytest.raises(RunFileError, match="written twice"):
            live.write("unet", "step_000", "conv_in", np.zeros((1, 4, 8, 8), np.float32))
    assert kept.exists()


def test_parity_run_live_gives_the_verdict_of_a_run_from_files(tmp_path, capsys):
    from sd_parity.cli import main as cli_main

    settings = ["run", "--model", "tiny-sd1", "--steps", "3", "--capture", "all", "--candidate", "torch", "--mode",
                "free", "--no-calibrate"]
    assert cli_main([*settings, "--output-dir", str(tmp_path / "files")]) == 0
    assert cli_main([*settings, "--live", "--output-dir", str(tmp_path / "live")]) == 0
    files, live = (load_summary(next((tmp_path / d).rglob("summary.json"))) for d in ("files", "live"))
    assert live["verdict"] == files["verdict"]
    assert [(t["key"], t["status"], t["metrics"]) for t in live["tensors"]] == \
        [(t["key"], t["status"], t["metrics"]) for t in files["tensors"]]
    assert "--live" in live["case"]["repro"]
    kept = next((tmp_path / "live").rglob("*-live.h5"))
    with RunReader(kept) as run:
        assert run.metadata["live"] is True and 0 < len(run.entries()) < len(files["tensors"])
