"""Block-level parity through the parity engine: each block of tiny-sd1 fed the reference's captured
inputs (isolated mode), judged with calibrated thresholds against an fp64 oracle.

Ids come from the block list: `unet_block_3_down-numpy-fp16`, `unet_block_mid-...`, `clip_block_0-...`,
`vae_decoder_block_1_up-...`, so `pytest -k unet_block_3` runs UNet down and up block 3 on every backend
and dtype, and `pytest -k "unet_block_3 and numpy"` narrows. Runs are cached on disk by content, so
selecting one block costs seconds once the cache is warm.
"""
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import pytest

from sd_parity.fixtures import FIXTURES
from sd_parity.runs.naming import Block
from sd_parity.cases.case import Case, run_case
from sd_parity.runs.config import RunConfig
from sd_parity.reports.summary import threshold_line, metric_line

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "blocks"
BACKENDS = ("torch", "numpy")
DTYPES = ("fp32", "fp16", "bf16")
CONFIG = RunConfig(model="tiny-sd1", steps=2, prompt="a photograph of an astronaut riding a horse",
                   negative_prompt="blurry")


def _blocks() -> list[Block]:
    """The blocks of tiny-sd1, from its configs (no model needs to exist to collect the tests)."""
    spec = FIXTURES["tiny-sd1"]
    unet, vae, clip = spec["unet"], spec["vae"], spec["text_encoder"]
    return ([Block("text_encoder", f"encoder.layers.{i}") for i in range(clip["num_hidden_layers"])]
            + [Block("unet", f"down_blocks.{i}") for i in range(len(unet["down_block_types"]))]
            + [Block("unet", "mid_block")]
            + [Block("unet", f"up_blocks.{i}") for i in range(len(unet["up_block_types"]))]
            + [Block("vae_decoder", "decoder.mid_block")]
            + [Block("vae_decoder", f"decoder.up_blocks.{i}") for i in range(len(vae["block_out_channels"]))])


@lru_cache(maxsize=None)
def _isolated_summary(backend: str, dtype: str) -> dict:
    """The isolated-mode comparison of one backend and dtype, with its report written under reports/blocks/."""
    case = Case(replace(CONFIG, dtype=dtype), backend, mode="isolated", label=f"{backend}-{dtype}")
    return run_case(case, REPORTS / case.name).summary


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", _blocks(), ids=lambda block: block.test_id)
def test_block(block, dtype, backend):
    summary = _isolated_summary(backend, dtype)
    rows = [row for row in summary["tensors"] if row["block"] == block.test_id and row["component"] == block.component]
    assert rows, f"the reference captured nothing in {block.test_id}"
    failing = [row for row in rows if row["status"] not in ("pass", "skipped")]
    if failing:
        worst = max(failing, key=lambda row: row["ratio"] if isinstance(row["ratio"], (int, float)) else 1e30)
        report = REPORTS / f"{backend}-{dtype}" / "report.html"
        pytest.fail(f"{block.test_id} ({backend} {dtype}): {len(failing)} of {len(rows)} tensors over their "
                    f"thresholds in isolation; worst {worst['key']}: {metric_line(worst)}; "
                    f"threshold {threshold_line(worst)}; open {report.as_uri()}", pytrace=False)


def test_dash_k_selects_exactly_one_blocks_tests():
    """`pytest -k unet_block_3` collects UNet down and up block 3 on every backend and dtype, nothing else."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-k", "unet_block_3", "tests"],
                             capture_output=True, text=True, cwd=root).stdout
    ids = [line for line in listing.splitlines() if "::" in line]
    assert ids and all("unet_block_3_down" in i or "unet_block_3_up" in i for i in ids), ids
    for backend in BACKENDS:
        for dtype in DTYPES:
            for direction in ("down", "up"):
                assert f"test_block[unet_block_3_{direction}-{dtype}-{backend}]" in listing
