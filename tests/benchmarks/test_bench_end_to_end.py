"""Issue 14.7: `parity run --model sd15-arch --steps 4 --height 256 --width 256 --backend torch --mode both`
(default capture, no oracle, an empty run cache) takes at most 1.5x the two pipelines run bare (diffusers and
impl torch, each loading its model in a fresh process, nothing captured). Every run uses the tool's default
thread count. The phases of the parity run are timed from its progress lines, as the profile beside the ratio.
"""
import json
import os
import shutil
import subprocess
import sys
import time

from sd_parity.fixtures import ensure_fixture

from .conftest import record

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = ["--model", "sd15-arch", "--steps", "4", "--height", "256", "--width", "256"]


def _bare(impl: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tests.benchmarks.bare_txt2img", "sd15-arch", impl, "4", "256"],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return time.perf_counter() - started


def _parity_run(tmp_path) -> tuple[float, dict[str, float]]:
    """Wall time of the whole command, and of each phase (from one progress line to the next)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SD_PARITY_RUN_CACHE": str(tmp_path / "runs")}
    command = [os.path.join(os.path.dirname(sys.executable), "parity"), "run", *SETTINGS, "--backend", "torch", "--mode", "both",
               "--no-calibrate", "--output-dir", str(tmp_path / "out")]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env=env)
    phases, phase, since = {}, "start-up", started
    for line in process.stdout:
        if line.startswith("[") and ": " in line:  # "[1/1] case: phase"
            now = time.perf_counter()
            phases[phase] = now - since
            phase, since = line.split(": ", 1)[1].strip(), now
    assert process.wait() in (0, 1), f"parity run failed ({process.returncode})"
    seconds = time.perf_counter() - started
    phases[f"{phase}, reports"] = time.perf_counter() - since
    return seconds, phases


def test_parity_run_end_to_end_against_the_bare_pipelines(tmp_path):
    ensure_fixture("sd15-arch")
    load = os.getloadavg()[0]
    diffusers, torch = _bare("diffusers"), _bare("torch")
    try:
        seconds, phases = _parity_run(tmp_path)
        written = sum(f.stat().st_size for f in tmp_path.rglob("*.h5"))
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # several GB of run files: never left behind
    ratio = seconds / (diffusers + torch)
    record("sd15-arch/parity-run-256-4steps", "parity", seconds, bare_diffusers=diffusers, bare_torch=torch,
           ratio_to_bare=ratio, phases=phases, run_file_bytes=written, load_average=[load, os.getloadavg()[0]])
    print(json.dumps({"ratio": ratio, "seconds": seconds, "diffusers": diffusers, "torch": torch, "phases": phases}))
    assert ratio <= 1.5, f"parity run {seconds:.1f} s = {ratio:.2f}x the bare pipelines ({phases})"
