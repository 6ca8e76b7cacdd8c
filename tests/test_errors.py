"""The failure contract (docs/errors.md): exit 0 parity, 1 divergence only, 2 bad input with a message that
says what to do, 3 internal error; typed exceptions in the Python API; names shown escaped."""
import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from crafted import DEFECTS, defective, small_tensors, write_run
from sd_parity.reports.summary import SCHEMA_VERSION, load_summary
from sd_parity.cli import main
from sd_parity.errors import BadInput, OutputError, RunFileError, SdParityError
from sd_parity.fixtures import IMAGES_DIR

INIT = str(IMAGES_DIR / "init_64.png")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(code, out, err, words=""):
    assert code == 2, err
    assert "Traceback" not in out + err
    assert "error" in err and words in err, err


# --- capture: arguments ---------------------------------------------------------------------------

CAPTURE_ARGUMENTS = {
    "negative seed": (["--seed", "-1"], "--seed -1 is outside"),
    "unknown device": (["--device", "bogus"], "is not a device"),
    "absent device": (["--candidate", "torch", "--device", "cuda:7"], "sees no CUDA GPU"),  # numpy ignores it
    "height 0": (["--height", "0"], "--height 0 is not a positive multiple of 8"),
    "width not a multiple of 8": (["--width", "12"], "--width 12"),
    "guidance NaN": (["--guidance", "nan"], "--guidance nan is not a finite number"),
    "eta infinite": (["--eta", "inf"], "--eta inf is not a finite number"),
    "negative eta": (["--eta", "-0.5"], "negative"),
    "zero steps": (["--steps", "0"], "--steps 0"),
    "absurd steps": (["--steps", "100000"], "--steps 100000"),
    "prompt not UTF-8": (["--prompt", "a red \udcff cube"], "not valid UTF-8"),
    "capture term unknown": (["--capture", "everything"], "unknown capture term"),
    "capture regex broken": (["--capture", "re:("], "bad regular expression"),
    "capture steps outside the run": (["--capture", "unet;steps=9"], "selects none of the run's 1 steps"),
    "model missing": (["--model", "/nonexistent/model"], "neither a fixture"),
    "candidate unknown": (["--candidate", "no_such_port"], "not a known candidate"),
    "init image missing": (["--pipeline", "img2img", "--init-image", "/nonexistent.png"], "does not exist"),
    "strength NaN": (["--pipeline", "img2img", "--init-image", INIT, "--strength", "nan"], "not a finite number"),
    "usage: a number that is not": (["--steps", "four"], "invalid int value"),
    "usage: unknown compression": (["--compress", "zip"], "invalid choice"),
}


@pytest.mark.parametrize("case", CAPTURE_ARGUMENTS)
def test_bad_capture_arguments_exit_2_with_a_message(capsys, tmp_path, case):
    extra, words = CAPTURE_ARGUMENTS[case]
    argv = ["capture", "--candidate", "numpy", "--model", "tiny-sd1", "--steps", "1", "--output", tmp_path / "r.h5"]
    # later options win in argparse, so each case overrides the defaults above
    assert_bad_input(*run_cli(capsys, *argv, *extra), words)
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary


def test_a_capture_selection_that_selects_nothing_is_refused(capsys, tmp_path):
    code, out, err = run_cli(capsys, "capture", "--candidate", "numpy", "--model", "tiny-sd1", "--steps", "1",
                             "--capture", "glob:no_such_module*", "--output", tmp_path / "r.h5")
    assert_bad_input(code, out, err, "selected none of the")
    assert not any(tmp_path.iterdir())


def test_run_config_fields_of_the_wrong_type_are_bad_input():
    from sd_parity.runs.config import RunConfig

    for fields in ({"steps": "4"}, {"guidance": "7.5"}, {"karras": 1}, {"prompt": ["a", 3]}, {"seed": 1.5},
                   {"height": True}):
        with pytest.raises(BadInput, match="RunConfig"):
            RunConfig(model="tiny-sd1", **fields)


# --- compare, inspect, validate: run files --------------------------------------------------------

@pytest.mark.parametrize("defect", DEFECTS)
def test_each_run_file_defect_is_refused_where_it_is_read(capsys, tmp_path, defect):
    bad = defective(tmp_path / "bad.h5", defect)
    ref = write_run(tmp_path / "ref.h5")
    words = DEFECTS[defect][1]
    assert_bad_input(*run_cli(capsys, "compare", ref, bad, "--output-dir", tmp_path / "out"), words)
    assert not (tmp_path / "out" / "summary.json").exists()
    code, out, err = run_cli(capsys, "validate", bad)
    assert code == 2 and words in out
    assert_bad_input(*run_cli(capsys, "inspect", bad), words)
    with pytest.raises(RunFileError, match=re.escape(words)):
        from sd_parity.runs.hdf5 import RunReader

        RunReader(bad)


def test_external_storage_never_reaches_the_outputs(capsys, tmp_path):
    """The issue's report: a dataset stored in a local file leaked that file into summary.json and HTML."""
    bad = defective(tmp_path / "bad.h5", "external storage")
    run_cli(capsys, "compare", write_run(tmp_path / "ref.h5"), bad, "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any(b"SECRET" in p.read_bytes()
                                                       for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize("content, words", [
    (b"not an hdf5 file at all", "not a readable HDF5 file"),
    (None, "truncated"),
])
def test_unreadable_and_truncated_files(capsys, tmp_path, content, words):
    path = write_run(tmp_path / "run.h5")
    data = path.read_bytes()
    path.write_bytes(content if content is not None else data[: len(data) // 3])
    assert_bad_input(*run_cli(capsys, "compare", write_run(tmp_path / "ref.h5"), path,
                              "--output-dir", tmp_path / "out"))
    assert_bad_input(*run_cli(capsys, "inspect", path), "")


def test_limits_are_configurable(tmp_path, monkeypatch):
    from sd_parity.runs.hdf5 import RunReader

    path = write_run(tmp_path / "zeros.h5", small_tensors(value=np.zeros(1 << 20, np.float32)), compression="gzip")
    monkeypatch.setenv("SD_PARITY_EXPANSION_FLOOR_BYTES", "1024")
    monkeypatch.setenv("SD_PARITY_MAX_EXPANSION", "2")
    with pytest.raises(RunFileError, match="SD_PARITY_MAX_EXPANSION"):
        RunReader(path)
    monkeypatch.setenv("SD_PARITY_MAX_EXPANSION", "1000")
    with RunReader(path) as reader:
        assert reader.read("unet/step_000/conv_in").shape == (1 << 20,)
    monkeypatch.setenv("SD_PARITY_MAX_METADATA_DEPTH", "1")
    with pytest.raises(RunFileError, match="nested 2 levels deep"):
        RunReader(write_run(tmp_path / "meta.h5", metadata={"a": {"b": 1}}))
    monkeypatch.setenv("SD_PARITY_MAX_TENSORS", "zero")
    with pytest.raises(BadInput, match="SD_PARITY_MAX_TENSORS='zero' is not a positive"):
        RunReader(path)


def test_empty_tensors_on_both_sides_compare_without_noise(capsys, tmp_path):
    tensors = small_tensors(value=np.zeros((0, 3), np.float32))
    code, out, err = run_cli(capsys, "compare", write_run(tmp_path / "a.h5", tensors),
                             write_run(tmp_path / "b.h5", tensors), "--output-dir", tmp_path / "out")
    assert code == 0 and err == "" and "Warning" not in out
    rows = load_summary(tmp_path / "out" / "summary.json")["tensors"]
    assert [r["status"] for r in rows] == ["pass", "pass"] and rows[1]["metrics"]["numel"] == 0


def test_nan_at_the_same_places_is_reported_with_a_warning(capsys, tmp_path):
    tensors = small_tensors(value=np.array([1, np.nan, 3, np.inf], np.float32))
    code, out, _ = run_cli(capsys, "compare", write_run(tmp_path / "a.h5", tensors),
                           write_run(tmp_path / "b.h5", tensors), "--output-dir", tmp_path / "out")
    assert code == 0
    assert re.search(r"^warning: .*1 tensor\(s\) hold NaN/Inf at the same places", out, re.M) and "2 of 4 elements" in out
    assert any("NaN/Inf" in w for w in json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"])


def test_a_comparison_of_zero_tensors_is_an_error(capsys, tmp_path):
    empty = tmp_path / "empty.h5"
    with __import__("sd_parity.runs.hdf5", fromlist=["RunWriter"]).RunWriter(empty, {}):
        pass
    assert_bad_input(*run_cli(capsys, "compare", empty, empty, "--output-dir", tmp_path / "out"),
                     "compared zero tensors")
    config = tmp_path / "parity.toml"
    config.write_text('[[overrides]]\nregex = "."\nskip = true\nreason = "all"\n')
    run = write_run(tmp_path / "run.h5")
    assert_bad_input(*run_cli(capsys, "compare", run, run, "--config", config, "--output-dir", tmp_path / "out"),
                     "overrides skip all 2")


@pytest.mark.parametrize("file, text, words", [
    ("parity.toml", '[tolerances.float32]\nrtol = "tight"\nreason = "x"\n', "rtol = 'tight'"),
    ("parity.toml", "[nope\n", "TOML"),
    ("names.toml", "[[rule]]\nregex = '('\nto = 'x'\n", "bad regular expression"),
    ("names.toml", "[[rule]]\nglob = '**'\nto = 'unet/main/x'\n", "both map to"),
])
def test_bad_config_and_name_maps(capsys, tmp_path, file, text, words):
    path = tmp_path / file
    path.write_text(text)
    option = "--config" if file == "parity.toml" else "--map"
    run = write_run(tmp_path / "run.h5")
    assert_bad_input(*run_cli(capsys, "compare", run, run, option, path, "--output-dir", tmp_path / "out"), words)


@pytest.mark.parametrize("text, words", [(b"\xff\xfe", "not readable JSON"), (b"[1]", "schema version"),
                                         (f'{{"schema_version": {SCHEMA_VERSION}}}'.encode(), "lacks")])
def test_bad_summaries_for_report(capsys, tmp_path, text, words):
    path = tmp_path / "summary.json"
    path.write_bytes(text)
    assert_bad_input(*run_cli(capsys, "report", path), words)


def test_usage_errors_exit_2(capsys):
    code, out, err = run_cli(capsys, "no-such-command")
    assert code == 2 and "invalid choice" in err and "Traceback" not in err


# --- exit 3 and 1 ------------------------------------------------------------------------------------

def test_an_internal_error_exits_3_with_its_traceback_in_a_log(capsys, tmp_path, monkeypatch):
    import sd_parity.cli.inspect as inspect_command

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inspect_command, "run", broken)
    monkeypatch.setenv("SD_PARITY_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, "inspect", "whatever.h5")
    assert code == 3 and "Traceback" not in err
    assert "internal error: ZeroDivisionError: a bug" in err
    log = re.search(r"traceback is in (\S+\.log)", err).group(1)
    assert "ZeroDivisionError" in open(log).read() and "Traceback" in open(log).read()
    code, out, err = run_cli(capsys, "inspect", "whatever.h5", "--debug")
    assert code == 3 and "Traceback" in err


def test_exit_1_means_divergence(capsys, tmp_path):
    ref = write_run(tmp_path / "ref.h5")
    cand = write_run(tmp_path / "cand.h5", small_tensors(value=np.arange(16, dtype=np.float32) + 1))
    code, out, _ = run_cli(capsys, "compare", ref, cand, "--output-dir", tmp_path / "out")
    assert code == 1 and "DIVERGENCE" in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["verdict"]["exit_code"] == 1


# --- the Python API ----------------------------------------------------------------------------------

def test_the_api_raises_typed_exceptions(tmp_path):
    from sd_parity.judging.compare import compare_runs
    from sd_parity.judging.name_map import NameMap
    from sd_parity.runs.selection import CaptureSpec

    for error in (RunFileError, OutputError):
        assert issubclass(error, BadInput) and issubclass(error, SdParityError)
    with pytest.raises(BadInput):
        CaptureSpec.parse("steps=x")
    with pytest.raises(BadInput):
        NameMap.from_dict({"rule": [{"glob": "a", "to": 1}]})
    with pytest.raises(RunFileError):
        compare_runs(tmp_path / "missing.h5", tmp_path / "missing.h5")
    with pytest.raises(OutputError, match="FIFO"):
        fifo = tmp_path / "fifo.h5"
        os.mkfifo(fifo)
        write_run(fifo)


# --- names are data -----------------------------------------------------------------------------------

NASTY = "conv\x1b[31mRED\nFAKE LINE\x07\u202e<script>"


def test_control_characters_in_names_are_escaped_everywhere(capsys, tmp_path):
    ref = write_run(tmp_path / "ref.h5", small_tensors(NASTY), metadata={"prompt": "a\x1b[2Jb"})
    cand = write_run(tmp_path / "cand.h5", small_tensors(NASTY, np.arange(16, dtype=np.float32) + 1))
    code, out, err = run_cli(capsys, "compare", ref, cand, "--output-dir", tmp_path / "out")
    assert code == 1
    for text in (out, err):
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
        assert not any(line.startswith("FAKE LINE") for line in text.splitlines())
    assert "conv\\x1b[31mRED\\x0aFAKE LINE\\x07\\u202e" in out
    junit = (tmp_path / "out" / "junit.xml").read_text()
    ET.fromstring(junit.encode())  # valid XML
    assert "\x1b" not in junit and "\\x1b" in junit
    html = (tmp_path / "out" / "report.html").read_text()
    assert "\x1b" not in html.split('id="report-data"')[0]  # the page's own text; its JSON escapes by itself
    assert "FAKE LINE\\x07\\u202e&lt;script&gt;" in html  # shown escaped, never as markup
    code, out, _ = run_cli(capsys, "inspect", ref, "--tensors")
    assert code == 0 and "\x1b" not in out and "FAKE LINE" not in out.splitlines()[0]
    summary = load_summary(tmp_path / "out" / "summary.json")
    assert summary["tensors"][1]["name"] == NASTY  # stored data keeps the name as it is
