"""The pytest plugin, as a port author uses it in the port's own test suite: a cached reference run from a
fixture, the port run against it, and assert_parity with a failure message that says what to look at."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sd_parity

PORT = Path(__file__).resolve().parent / "ports" / "torch_port.py"


# The port author's test of one block: this is the whole of it.
def test_torch_port_unet_down_block_1_alone(parity_reference):
    ref = parity_reference("tiny-sd1", steps=2, capture="blocks")
    cand = sd_parity.run_candidate(f"{PORT}:make", ref, mode="isolated")
    sd_parity.assert_parity(ref, cand, only="unet_block_1_down")


def test_a_failing_check_names_the_worst_tensor_its_metrics_and_its_report(parity_reference, parity_report_dir):
    ref = parity_reference("tiny-sd1", steps=2, capture="blocks")
    cand = sd_parity.run_candidate(f"{PORT}:make_faulty", ref, mode="isolated")
    sd_parity.assert_parity(ref, cand, only="unet_block_3_down")  # no transformer there: the fault is elsewhere
    with pytest.raises(sd_parity.NotAtParity) as caught:
        sd_parity.assert_parity(ref, cand, only="unet_block_1_down")
    failure = caught.value
    lines = str(failure).splitlines()
    failing = [r for r in failure.summary["tensors"] if r["block"] == "unet_block_1_down" and r["status"] == "fail"]
    worst = max(failing, key=lambda r: r["ratio"])
    assert lines[0].startswith(f"Not at parity in unet_block_1_down: {len(failing)} of ")
    assert lines[1].startswith("Runs: candidate ") and lines[1].endswith("calibrated against the fp64 oracle")
    assert lines[2] == f"Worst tensor: {worst['key']} (block unet_block_1_down)"
    assert lines[3].startswith("  metrics:   max_abs ") and lines[4].startswith("  threshold: calibrated ")
    assert lines[5] == f"  ratio:     {worst['ratio']:.3g} x its threshold"
    assert lines[-1] == f"Report: {failure.report.as_uri()}" and failure.report.is_file()
    assert failure.report.parent == parity_report_dir


def test_only_must_select_something(parity_reference):
    ref = parity_reference("tiny-sd1", steps=2, capture="blocks")
    with pytest.raises(sd_parity.BadInput, match="selects none of the reference's tensors"):
        sd_parity.assert_parity(ref, ref, only="unet_block_9_down")


PORT_TESTS = '''
import sd_parity

def test_port(parity_reference):
    ref = parity_reference("tiny-sd1", steps=2, capture="blocks")
    sd_parity.assert_parity(ref, sd_parity.run_candidate("{port}:make", ref, mode="isolated"), only="unet")

def test_faulty_port(parity_reference):
    ref = parity_reference("tiny-sd1", steps=2, capture="blocks")
    sd_parity.assert_parity(ref, sd_parity.run_candidate("{port}:make_faulty", ref, mode="isolated"), only="unet")
'''


def _port_suite(tmp_path, *options):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--parity-reports",
                           str(tmp_path / "reports"), *options, "test_port.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)


def test_the_plugin_loads_by_entry_point_in_a_ports_own_suite(tmp_path):
    (tmp_path / "test_port.py").write_text(PORT_TESTS.format(port=PORT))
    done = _port_suite(tmp_path, "--parity-write-baseline", str(tmp_path / "baseline"))
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-3000:]
    assert "Not at parity in unet: " in done.stdout and "Worst tensor: unet/" in done.stdout
    assert (tmp_path / "reports" / "test_port.py-test_faulty_port" / "report.html").is_file()
    assert not (tmp_path / "reports" / "test_port.py-test_port").exists()  # a passing check writes nothing
    # the known divergence is in the baseline: against it, nothing got worse and both checks pass
    written = json.loads((tmp_path / "baseline" / "test_port.py-test_faulty_port" / "summary.json").read_text())
    assert written["verdict"]["status"] == "divergence"
    done = _port_suite(tmp_path, "--parity-baseline", str(tmp_path / "baseline"))
    assert "2 passed" in done.stdout, done.stdout[-3000:]
