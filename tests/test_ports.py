"""Ports are first-class candidates: the doubles under tests/ports/ (a PyTorch port written in another
style than impl/, and a NumPy port reporting with tap/wrap) get free mode, isolated mode, calibrated
thresholds and the full report from the same `parity run` as impl/, named on the command line, by
entry point or as pkg.module:factory, with nothing in parity/ written for them."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import sd_parity
from sd_parity.reports.summary import load_summary
from sd_parity.candidates.registry import label, registered, resolve
from sd_parity.cases.case import Case, run_case
from sd_parity.fixtures import FIXTURES
from sd_parity.runs.config import RunConfig
from sd_parity.runs.hdf5 import RunReader
from sd_parity.runs.naming import Block
from sd_parity.testing import config_of

ROOT = Path(__file__).resolve().parent.parent
PORTS = ROOT / "tests" / "ports"
TORCH_PORT = "tests/ports/torch_port.py"


def _blocks_with_attention() -> list[str]:
    """tiny-sd1's UNet blocks that hold transformers (where the faulty port's GEGLU lives)."""
    unet = FIXTURES["tiny-sd1"]["unet"]
    down = [Block("unet", f"down_blocks.{i}") for i, kind in enumerate(unet["down_block_types"]) if "CrossAttn" in kind]
    up = [Block("unet", f"up_blocks.{i}") for i, kind in enumerate(unet["up_block_types"]) if "CrossAttn" in kind]
    return [b.test_id for b in down] + ["unet_block_mid"] + [b.test_id for b in up]


def _parity_run(tmp_path, candidate: str) -> tuple[int, dict]:
    done = subprocess.run([str(Path(sys.executable).parent / "parity"), "run", "--model", "tiny-sd1", "--steps", "2",
                           "--candidate", candidate, "--output-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done.returncode, load_summary(next(tmp_path.glob("*/summary.json")))


def test_torch_port_is_at_parity_free_and_isolated_from_the_command_line(tmp_path):
    code, summary = _parity_run(tmp_path, f"{TORCH_PORT}:make")
    assert code == 0 and summary["verdict"]["status"] == "parity", summary["verdict"]["text"]
    assert summary["mode"] == {"candidate": "free", "calibrated": True, "isolated_given": True}
    assert summary["runs"]["candidate"]["metadata"]["impl"] == "torch-port"
    counts = summary["coverage"]["counts"]
    assert counts["fail"] == counts["missing"] == 0 and counts["pass"] >= 150
    isolated = summary["isolated"]["tensors"]
    assert not [r["key"] for r in isolated if r["status"] in ("fail", "shape_mismatch")]
    block_outputs = {r["block"] for r in isolated if r["status"] == "pass" and r["kind"] == "output" and r["block"]}
    spec = FIXTURES["tiny-sd1"]
    expected = ({f"clip_block_{i}" for i in range(spec["text_encoder"]["num_hidden_layers"])}
                | {Block("unet", f"{side}_blocks.{i}").test_id for side in ("down", "up")
                   for i in range(len(spec["unet"]["block_out_channels"]))}
                | {"unet_block_mid", "vae_decoder_block_mid"}
                | {f"vae_decoder_block_{i}_up" for i in range(len(spec["vae"]["block_out_channels"]))})
    assert block_outputs == expected, "every block ran alone in isolated mode and passed"
    stages = {r["name"] for r in isolated if r["component"] == "pipeline" and r["status"] == "pass"}
    assert {"latent_model_input", "timestep", "noise_pred", "step_output"} <= stages
    assert (tmp_path / summary["case"]["name"] / "report.html").is_file()


def test_a_fault_in_the_port_is_detected_and_blamed_on_its_blocks(tmp_path):
    code, summary = _parity_run(tmp_path, f"{TORCH_PORT}:make_faulty")
    assert code == 1 and summary["verdict"]["status"] == "divergence"
    assert summary["first_divergence"]["block"] == _blocks_with_attention()[0]
    assert [c["block"] for c in summary["culprits"]] == _blocks_with_attention()


@pytest.fixture
def entry_point(tmp_path, monkeypatch):
    """An installed distribution whose entry point registers the torch port as `torch-port`."""
    info = tmp_path / "site" / "torch_port_dist-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch-port-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sd_parity.candidates]\ntorch-port = torch_port:make\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(PORTS))
    importlib.invalidate_caches()
    return "torch-port"


def test_a_port_registered_by_entry_point_gets_the_full_treatment(tmp_path, entry_point):
    assert entry_point in registered()
    result = run_case(Case(RunConfig(model="tiny-sd1", steps=2), entry_point), tmp_path / "case")
    assert result.passed, result.summary["verdict"]["text"]
    assert result.case.name == "txt2img-ddim-torch-port-fp32"
    assert set(result.runs) == {"reference", "oracle", "block_oracle", "candidate", "isolated"}
    with RunReader(result.runs["reference"]) as reader:
        assert reader.metadata["capture"] == "blocks"  # the reference captured what the port reports


def test_module_and_file_specs_resolve(monkeypatch):
    monkeypatch.chdir(PORTS)  # pkg.module:factory is found in the current folder, as `python -m` would
    assert type(resolve("torch_port:make")).__name__ == "TorchPort"
    monkeypatch.chdir(ROOT)
    assert resolve(f"{TORCH_PORT}:make_faulty").name == "torch-port-tanh-gelu"
    assert [label(s) for s in ("numpy", f"{TORCH_PORT}:make", "my_port.parity:make_fast")] == [
        "numpy", "torch_port.make", "parity.make_fast"]


def test_numpy_port_replays_the_references_sampler_noise(tmp_path):
    config = RunConfig(model="tiny-sd1", steps=3, scheduler="euler_ancestral")
    result = run_case(Case(config, str(PORTS / "numpy_port.py") + ":make", mode="free"), tmp_path / "case")
    assert result.passed, result.summary["verdict"]["text"]
    noise = [r for r in result.summary["tensors"] if r["name"] == "noise" and r["component"] == "pipeline"]
    assert len(noise) == 3 and all(r["status"] == "pass" for r in noise)
    assert result.summary["isolated"] is None and "isolated" not in result.runs  # it runs no blocks alone


def test_numpy_port_writes_its_own_run_file(tmp_path, reference_run):
    fields = dict(steps=2, capture="blocks")
    ref, oracle = reference_run(**fields), reference_run(**fields, dtype="fp64")
    config = config_of(ref)
    port = resolve(f"{PORTS / 'numpy_port.py'}:make")
    port.prepare(config, config.model_dir())
    with sd_parity.writer(tmp_path / "cand.h5", reference=ref, name="numpy-port", capture="blocks") as run:
        port.generate(run.replay, config.guidance)
    summary = sd_parity.assert_parity(ref, run.path, oracle=oracle)
    assert summary["warnings"] == [] and summary["coverage"]["counts"]["missing"] == 0


@pytest.mark.parametrize("spec, message", [
    ("no-such-port", "not a known candidate"),
    ("tests/ports/absent.py:make", "does not exist"),
    (f"{TORCH_PORT}:absent", "has no callable 'absent'"),
    ("no_such_module_anywhere:make", "cannot import no_such_module_anywhere"),
])
def test_bad_candidate_specs_say_what_to_fix(monkeypatch, spec, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(sd_parity.BadInput, match=message):
        resolve(spec)


def test_a_ports_own_failures_are_reported_as_its_own(tmp_path):
    (tmp_path / "helper.py").write_text("class NoCapture:\n    name = 'x'\n")
    (tmp_path / "port.py").write_text(
        "from helper import NoCapture\n"  # a sibling module: the file's folder is on sys.path
        "def broken():\n    raise OSError('weights not found')\n"
        "def no_capture():\n    return NoCapture()\n"
        "class BadTensors:\n    tensors = 'blocks;nonsense'\n    def capture(self, run): pass\n")
    for factory, message in (("broken", "its factory failed: OSError: weights not found"),
                             ("no_capture", "has no capture\\(run\\) method"),
                             ("BadTensors", "its `tensors` is not a capture spec")):
        with pytest.raises(sd_parity.BadInput, match=message):
            resolve(f"{tmp_path / 'port.py'}:{factory}")
