"""Issue 3 floors, as benchmarks: impl-torch <= 1.05x and impl-numpy <= 1.5x diffusers' time per network
call; impl UNet peak memory beyond weights <= 1.5 GB at 64x64 latents, batch 2 (sd15-arch)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sd_parity.fixtures import ensure_fixture

from .conftest import record
from .networks import COMPONENTS, IMPLS, network

SIZES = [("tiny-sd1", 32), ("sd15-arch", 32), ("sd15-arch", 64)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("model, latent", SIZES, ids=[f"{m}-{l}" for m, l in SIZES])
def test_network_call(benchmark, model, latent, component, impl):
    if component == "text_encoder" and latent == 64:
        pytest.skip("the text encoder does not depend on the latent size")
    call, _ = network(ensure_fixture(model), impl, component, latent)
    with torch.inference_mode():
        call()  # warm-up: first-call allocations, kernel selection
        big = model == "sd15-arch" and component != "text_encoder"
        benchmark.pedantic(call, rounds=2 if big else 5, iterations=1, warmup_rounds=0)
    record(f"{model}/{component}/{latent}", impl, benchmark.stats.stats.min)


@pytest.mark.parametrize("impl", IMPLS)
def test_unet_peak_memory_beyond_weights(impl):
    folder = ensure_fixture("sd15-arch")
    result = subprocess.run([sys.executable, "-m", "tests.benchmarks.networks", str(folder), impl, "unet", "64", "2"],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    beyond = measured["peak_rss"] - measured["weight_bytes"]
    record("sd15-arch/unet-memory/64", impl, measured["seconds"], peak_rss=measured["peak_rss"],
           beyond_weights=beyond)
    if impl != "diffusers":
        assert beyond <= 1.5e9 + _runtime_bytes(), f"{beyond / 1e9:.2f} GB beyond the weights"


def _runtime_bytes() -> int:
    """What the Python process holds before any model: interpreter, NumPy, torch (not the model's doing)."""
    probe = subprocess.run([sys.executable, "-c", "import numpy, torch, impl.models; "
                            "from tests.benchmarks.networks import peak_rss; print(peak_rss())"],
                           capture_output=True, text=True, cwd=REPO)
    return int(probe.stdout.strip())
