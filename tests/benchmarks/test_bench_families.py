"""Issue 13 floors, as benchmarks: the sd21-arch and sdxl-arch UNet (exact SD 2.1 and SDXL base
architectures, random weights), one guided call (batch 2) at 64x64 latents, fp32, one thread each:
impl-torch <= 1.05x and impl-numpy <= 1.35x diffusers' time measured in the same run; the SDXL impl
UNet's peak memory beyond its weights <= 2 GB.

Every configuration runs alone in a fresh process (the SDXL UNet is 10.3 GB at fp32, so two in one
process would not fit the machine), which also makes its peak RSS its own. `record` puts every figure
in reports/benchmarks.json (tests/benchmarks/conftest.py).

The ratios are of CPU time (`time.process_time` of the one-threaded call): on a machine shared with
other work, wall time measures the neighbours as much as the code (diffusers and impl run minutes
apart, not side by side). Wall times are recorded too.
"""
import json
import os
import subprocess
import sys

import pytest

from sd_parity.fixtures import ensure_fixture

from .conftest import RESULTS, record

MODELS = ("sd21-arch", "sdxl-arch")
IMPLS = ("diffusers", "torch", "numpy")  # diffusers first: the ratios need its time
LATENT, BATCH, THREADS = 64, 2, 1
RATIO_FLOORS = {"torch": 1.05, "numpy": 1.35}
MEMORY_FLOOR = 2e9  # bytes beyond the weights (and the interpreter + libraries), SDXL impl UNet
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


def _measure(script: list[str]) -> dict:
    result = subprocess.run([sys.executable, *script], capture_output=True, text=True, cwd=REPO, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _runtime_bytes(impl: str) -> int:
    """Peak RSS of a process that imports what the measured one does, before any model (not the model's)."""
    library = "diffusers" if impl == "diffusers" else "sd_parity.impl.models"
    return _measure(["-c", f"import json, numpy, torch, {library}; "
                           "from tests.benchmarks.networks import peak_rss; print(json.dumps(peak_rss()))"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", MODELS)
def test_family_unet_guided_call(model, impl):
    folder = ensure_fixture(model)
    measured = _measure(["-m", "tests.benchmarks.networks", str(folder), impl, "unet", str(LATENT), str(BATCH),
                         str(THREADS)])
    runtime = _runtime_bytes(impl)
    beyond = measured["peak_rss"] - measured["weight_bytes"] - runtime
    case = f"{model}/unet/{LATENT}"
    record(case, impl, measured["cpu_seconds"], wall_seconds=measured["seconds"], peak_rss=measured["peak_rss"],
           weight_bytes=measured["weight_bytes"], beyond_weights=beyond, runtime_bytes=runtime, threads=THREADS)
    if impl == "diffusers":
        return
    if model == "sdxl-arch":
        assert beyond <= MEMORY_FLOOR, f"{beyond / 1e9:.2f} GB beyond the weights"
    base = RESULTS[case].get("diffusers", {}).get("seconds")
    if base is None:
        pytest.skip("diffusers was not measured in this run; no ratio")
    ratio = measured["cpu_seconds"] / base
    assert ratio <= RATIO_FLOORS[impl], \
        f"{impl} {ratio:.2f}x diffusers ({measured['cpu_seconds']:.1f} CPU s vs {base:.1f} CPU s)"
