"""Issue 11: `parity run --model sd15-arch` calibrated (fp64 oracle of the whole run and block-local oracle
of the isolated runs), 256x256, 2 steps, both impl backends, peaks under 16 GB of resident memory.

The run goes in a fresh process, with a fresh run cache (so every run file is produced, none read from an
earlier run), one thread per library; its peak RSS (VmHWM) is its own."""
import json
import os
import subprocess
import sys
import time

from sd_parity.fixtures import ensure_fixture

from .conftest import record

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMIT = 16e9


def test_calibrated_sd15_run_memory(tmp_path):
    ensure_fixture("sd15-arch")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SD_PARITY_RUN_CACHE": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    script = f"""
import json, sys
from sd_parity.cli import main
from tests.benchmarks.networks import peak_rss
code = main(["run", "--model", "sd15-arch", "--height", "256", "--width", "256", "--steps", "2",
             "--output-dir", {str(tmp_path / "reports")!r}])
print(json.dumps({{"exit_code": code, "peak_rss": peak_rss()}}))
"""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    record("sd15-arch/parity-run-calibrated-256-2steps", "parity", seconds, peak_rss=measured["peak_rss"])
    assert measured["exit_code"] == 0, result.stdout[-3000:]
    assert measured["peak_rss"] < LIMIT, f"{measured['peak_rss'] / 1e9:.2f} GB"
