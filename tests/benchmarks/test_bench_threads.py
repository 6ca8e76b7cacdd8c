"""Issue 14.1: with one other CPU-bound process on the machine, a tiny-sd1 20-step txt2img takes at most
2x its time on an idle machine, for both backends, at the tool's default thread count. Each run is a
fresh process (tests/benchmarks/txt2img_call.py), as a `parity` command would be."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from sd_parity.fixtures import ensure_fixture

from .conftest import record

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUNDS = 5


def _txt2img(backend: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-m", "tests.benchmarks.txt2img_call", "tiny-sd1", backend, "20"],
                            capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median_seconds(backend: str, env: dict) -> tuple[float, int]:
    runs = [_txt2img(backend, env) for _ in range(ROUNDS)]
    return statistics.median(r["seconds"] for r in runs), runs[0]["threads"]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_txt2img_beside_a_busy_process(backend):
    ensure_fixture("tiny-sd1")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    idle, threads = _median_seconds(backend, env)
    idle_load = os.getloadavg()[0]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded, _ = _median_seconds(backend, env)
        busy_load = os.getloadavg()[0]
    finally:
        busy.kill()
        busy.wait()
    slowdown = loaded / idle
    record("tiny-sd1/txt2img-20steps/beside-a-busy-process", backend, loaded, idle_seconds=idle, slowdown=slowdown,
           threads=threads, load_average_idle=idle_load, load_average_busy=busy_load)
    assert slowdown <= 2.0, f"{loaded:.2f} s beside a busy process vs {idle:.2f} s idle ({slowdown:.1f}x)"
