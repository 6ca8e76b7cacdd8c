"""A port in another language, driven through its command line (`parity run --candidate-cmd`): a stand-in
program that only exchanges files gets culprit blocks like a Python candidate, and its failures come
back as clear bad-input errors quoting its stderr."""
import shlex
import sys
from pathlib import Path

import pytest

from sd_parity.reports.summary import load_summary
from sd_parity.candidates.faults import FAULTS
from sd_parity.candidates.registry import resolve
from sd_parity.candidates.subprocess import CommandCandidate
from sd_parity.cli import main

STANDIN = Path(__file__).resolve().parent / "standin_port.py"
PROGRAM = f"{shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))}"
BLOCK_CMD = f"{PROGRAM} run-block {{component}} {{block}} {{inputs}} {{outputs}} {{config}}"
RUN_CMD = f"{PROGRAM} run {{config}} {{output}}"
# test_faults' configuration, so the reference and its fp64 oracle come from the run cache
BASE = ["--model", "tiny-sd1", "--steps", "3", "--prompt", "a photograph of an astronaut riding a horse",
        "--negative-prompt", "blurry"]


def _summary(out: Path) -> dict:
    return load_summary(next(out.glob("*/summary.json")))


def test_isolated_mode_through_a_command_names_the_faulted_block(tmp_path, monkeypatch):
    fault = FAULTS["groupnorm_eps"]
    monkeypatch.setenv("STANDIN_FAULT", fault.name)
    out = tmp_path / "out"
    assert main(["run", *BASE, "--candidate-cmd", BLOCK_CMD, "--candidate-cmd-run", RUN_CMD,
                 "--output-dir", str(out)]) == 1
    summary = _summary(out)
    assert summary["case"]["name"] == "txt2img-ddim-standin_port-fp32"
    assert [c["block"] for c in summary["culprits"]] == [fault.block.test_id] == ["unet_block_1_down"]
    component, _, name = summary["first_divergence"]["key"].split("/", 2)
    assert fault.names(component, name)
    # every other block of every component ran through the command, and passed in isolation
    blocks = {b["id"]: b["status"] for b in summary["isolated"]["blocks"] if "_block_" in b["id"]}
    assert {"clip_block_0", "unet_block_mid", "vae_decoder_block_0_up"} <= set(blocks)
    assert {b for b, status in blocks.items() if status != "pass"} == {"unet_block_1_down"}
    assert len(blocks) == 3 + 9 + 5  # CLIP layers, UNet down/mid/up, VAE decoder mid/up
    missing = [r for r in summary["isolated"]["tensors"] if r["status"] == "missing"]
    # what no block run produces: the pipeline stages (no run_stage through a command) and component inputs
    assert {(r["component"], r["name"]) for r in missing if r["component"] != "pipeline"} == {
        ("text_encoder", "@input_ids"), ("unet", "@sample"), ("unet", "@timestep"), ("unet", "@encoder_hidden_states"),
        ("vae_decoder", "@z")}
    # the repro line names a --candidate spec that resolves to the same command
    spec = shlex.split(summary["case"]["repro"])[shlex.split(summary["case"]["repro"]).index("--candidate") + 1]
    again = resolve(spec)
    assert (again.block_command, again.run_command, again.name) == (BLOCK_CMD, RUN_CMD, "standin_port")


@pytest.mark.parametrize("mode, message", [
    ("crash", "failed on text_encoder (whole component) with exit code 101; its stderr ended with:\n"
              "    standin: loading weights\n    standin: panicked at 'index out of bounds' in down_block.rs:42"),
    ("empty", "exited 0 but wrote nothing into {outputs}; write the block's outputs there, or exit 3"),
    ("wrong_batch", "wrote down_blocks.0[0] with shape [1, 32, 4, 4], but the block's inputs have batch 2"),
])
def test_failures_of_the_program_are_bad_input_quoting_its_stderr(tmp_path, monkeypatch, capsys, mode, message):
    monkeypatch.setenv("STANDIN_MODE", mode)
    monkeypatch.setenv("STANDIN_ONLY", "unet" if mode == "wrong_batch" else "")
    assert main(["run", *BASE, "--no-calibrate", "--mode", "isolated", "--candidate-cmd", BLOCK_CMD,
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "  command: " in err and "its files are kept in" in err
    kept = Path(err.split("its files are kept in ")[1].split()[0])
    assert (kept / "inputs" / "run.json").is_file()  # the author can rerun the command by hand on these


def test_command_templates_are_checked_before_anything_runs(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["run", *BASE, "--candidate-cmd", "my-port {component} {blok}", "--output-dir", out]) == 2
    assert "unknown placeholder(s) {blok}; available: {component}, {block}" in capsys.readouterr().err
    assert main(["run", *BASE, "--mode", "free", "--candidate-cmd", BLOCK_CMD, "--output-dir", out]) == 2
    assert "--mode free needs --candidate-cmd-run" in capsys.readouterr().err
    assert main(["run", *BASE, "--no-calibrate", "--mode", "isolated", "--candidate-cmd",
                 "/nonexistent/my-port {component} {block} {inputs} {outputs}", "--output-dir", out]) == 2
    assert "cannot be started" in capsys.readouterr().err


def test_spec_round_trip_and_names():
    candidate = CommandCandidate("./target/release/sd-port run-block {component}", "sd-port run {config} {output}")
    again = CommandCandidate.from_spec(candidate.spec())
    assert (again.block_command, again.run_command, again.name) == (candidate.block_command, candidate.run_command,
                                                                    "sd-port")
    assert CommandCandidate(None, "node port.js run {config} {output}").name == "port"
