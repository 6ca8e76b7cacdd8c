"""Everyday use of the command line: inspect's --json/--filter/--stats, compare's default output folder,
the model's native size, the terminal table (keys whole, colour only when asked, readable numbers) and
run files whose groups list in execution order."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from sd_parity.cli import main
from sd_parity.fixtures import FIXTURES
from sd_parity.judging.compare import compare_runs
from sd_parity.judging.verdict import make_verdict
from sd_parity.progress import Phases
from sd_parity.reports.summary import build_summary, format_table, number_text
from sd_parity.runs.config import RunConfig, native_size
from test_compare import unet_run, write_run  # pytest puts tests/ on sys.path

LONG = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.a_rather_long_module_name_indeed"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_filters_with_the_one_glob_dialect_and_shows_values(tmp_path, capsys):
    tensors = unet_run()
    tensors[("unet", "step_000", "down_blocks.0[0]")] = np.array([1.0, np.nan, 3.0, np.inf], np.float32)
    path = write_run(tmp_path / "r.h5", tensors)
    code, out, _ = run(capsys, "inspect", path, "--filter", "unet/step_000/down_blocks.0*", "--stats")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ")]
    assert listed == ["down_blocks.0@0", "down_blocks.0.resnets.0", "down_blocks.0", "down_blocks.0[0]"]
    line = next(line for line in out.splitlines() if "down_blocks.0[0]" in line)
    assert "min 1 max 3 mean 2 std 1" in line and "nan=1" in line and "inf=1" in line
    # brackets are literal, as in name maps and overrides: [0] is not a character class
    code, out, _ = run(capsys, "inspect", path, "--filter", "down_blocks.0[0]", "--json")
    document = json.loads(out)
    assert [t["key"] for t in document["tensors"]] == ["unet/step_000/down_blocks.0[0]"]
    assert document["total"]["tensors"] == 1 and document["metadata"]["prompt"] == "a red cube"
    code, out, _ = run(capsys, "inspect", path, "--json", "--stats")
    document = json.loads(out)
    assert len(document["tensors"]) == len(tensors)
    values = np.asarray(tensors[("unet", "step_001", "down_blocks.2")], np.float64)
    stats = next(t["stats"] for t in document["tensors"] if t["key"] == "unet/step_001/down_blocks.2")
    assert stats["mean"] == pytest.approx(values.mean()) and stats["std"] == pytest.approx(values.std())
    assert stats["min"] == values.min() and stats["nan"] == 0
    code, _, err = run(capsys, "inspect", path, "--filter", "vae_decoder/**")
    assert code == 2 and "matches none of the" in err


def test_inspect_piped_into_head_ends_cleanly(tmp_path):
    tensors = {("unet", f"step_{s:03d}", f"t{i}"): np.zeros(2, np.float32) for s in range(50) for i in range(40)}
    path = write_run(tmp_path / "big.h5", tensors)
    parity = Path(sys.executable).parent / "parity"
    done = subprocess.run(f"'{parity}' inspect '{path}' --tensors | head -3", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert len(done.stdout.splitlines()) == 3 and "Traceback" not in done.stderr


def test_compare_writes_beside_the_candidate_by_default(tmp_path, capsys):
    ref = write_run(tmp_path / "ref.h5", unet_run())
    (tmp_path / "runs").mkdir()
    cand = write_run(tmp_path / "runs" / "port.h5", unet_run(offset={(1, 2): 1.0}))
    code, out, _ = run(capsys, "compare", ref, cand)
    folder = tmp_path / "runs" / "port-parity"
    assert code == 1 and (folder / "report.html").is_file() and (folder / "summary.json").is_file()
    assert f"report: {(folder / 'report.html').as_uri()}" in out
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["command"] == f"parity compare {ref} {cand} --output-dir {folder}"
    # every option used is in the reproduce command, spelled as typed (here the reference as its own oracles)
    iso = write_run(tmp_path / "runs" / "port-isolated.h5", unet_run(offset={(1, 2): 1.0}), mode="isolated")
    code, _, err = run(capsys, "compare", ref, cand, "--oracle", ref, "--block-oracle", ref, "--isolated", iso)
    assert code == 1, err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["command"] == (f"parity compare {ref} {cand} --oracle {ref} --block-oracle {ref} --isolated {iso} "
                                  f"--output-dir {folder}")


def test_height_and_width_default_to_the_models_native_size(tmp_path):
    for name, spec in FIXTURES.items():  # fixtures: UNet sample_size x the VAE's 2 per level after the first
        assert native_size(name) == spec["default_size"], name
    folder = tmp_path / "my-model"
    for part, config in (("unet", {"sample_size": 96}), ("vae", {"block_out_channels": [128, 256, 512, 512]})):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    config = RunConfig(model=str(folder))
    assert (config.height, config.width) == (768, 768)
    assert RunConfig(model=str(folder), width=512).width == 512
    assert native_size(str(tmp_path / "no-such-folder")) == 512  # model_dir() then says what is wrong


def divergent_summary(tmp_path) -> dict:
    ref_tensors = unet_run()
    ref_tensors[("unet", "step_000", LONG)] = np.ones(64, np.float32)
    cand_tensors = dict(unet_run(offset={(0, 1): 0.5}))
    cand_tensors[("unet", "step_000", LONG)] = np.full(64, 1.5, np.float32)
    ref, cand = write_run(tmp_path / "r.h5", ref_tensors), write_run(tmp_path / "c.h5", cand_tensors)
    comparison = compare_runs(ref, cand)
    return build_summary(comparison, make_verdict(comparison))


def test_the_terminal_table_keeps_keys_whole_and_colours_only_when_asked(tmp_path):
    summary = divergent_summary(tmp_path)
    plain = format_table(summary)
    assert "\x1b[" not in plain and f"unet/step_000/{LONG}" in plain and "…" not in plain
    assert all(line == line.rstrip() for line in plain.splitlines())
    narrow = format_table(summary, width=80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    joined = "".join(line.strip() for line in narrow.splitlines())
    assert f"unet/step_000/{LONG}".replace(" ", "") in joined.replace(" ", "")  # folded, never cut
    coloured = format_table(summary, color=True)
    assert "\x1b[" in coloured and "DIVERGENCE" in coloured


def test_numbers_read_easily():
    assert [number_text(v) for v in (2056886682, 99_999, 1.3e-06, 0.000172, 700.4, float("inf"), None)] == \
        ["2.06e9", "99999", "1.3e-6", "0.000172", "700", "inf", "-"]


def test_passing_rows_show_no_ulp_counts(tmp_path):
    ref = write_run(tmp_path / "r.h5", unet_run())
    cand = write_run(tmp_path / "c.h5", {k: (v * np.float32(1 + 1e-7) if v.dtype == np.float32 else v)
                                         for k, v in unet_run().items()})
    comparison = compare_runs(ref, cand)
    table = format_table(build_summary(comparison, make_verdict(comparison)))
    rows = [line.split() for line in table.splitlines() if line.startswith("pass ")]
    assert rows and all(row[4] == "·" for row in rows)


def test_run_file_groups_list_in_execution_order(tmp_path):
    names = ["zeta", "alpha", "mid", "beta"]
    write_run(tmp_path / "r.h5", {("unet", "step_001", "later"): np.zeros(2, np.float32),
                                  **{("unet", "step_000", n): np.zeros(2, np.float32) for n in names},
                                  ("pipeline", "main", "x_T"): np.zeros(2, np.float32)})
    with h5py.File(tmp_path / "r.h5") as f:
        assert list(f.keys())[:2] == ["unet", "pipeline"]
        assert list(f["unet"].keys()) == ["step_001", "step_000"] and list(f["unet/step_000"].keys()) == names


def test_phases_bar_counts_cases_run_here_and_in_workers(capsys):
    # a case run in this process announces its phases; one run by a worker only reports it is done
    phases = Phases(total=7, cases=2, enabled=True)
    phases.case(1)
    for text in ("reference fp32", "numpy free", "compare"):
        phases.start(text)
    assert phases._bar.n == 2  # the phase still running is not done
    phases.done(1, 3, "ok   case-1")
    phases.done(2, 4, "FAIL case-2")  # from a worker: all its phases at once
    assert phases._bar.n == phases._bar.total == 7
    phases.close()
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["ok   case-1", "FAIL case-2"] and "[1/2] compare" in captured.err
    lines = Phases(total=7, cases=2, enabled=False)  # no terminal: one line per phase, for CI logs
    lines.case(2)
    lines.start("oracle fp64")
    lines.done(2, 4, "ok   case-2")
    assert Phases(0, 2, enabled=False, lines=False).start("quiet") is None
    assert capsys.readouterr() == ("ok   case-2\n", "[2/2] oracle fp64\n")
