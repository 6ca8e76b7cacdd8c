"""docs/run-format.md is true: its C++ and Rust writers build and write valid runs, its pipeline-tensor table
lists exactly what the reference writes, and a port writing what the table says gets a complete verdict."""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sd_parity.judging.compare import compare_runs
from sd_parity.judging.verdict import make_verdict
from sd_parity.runs.directory import DirectoryRunWriter
from sd_parity.runs.hdf5 import RunReader
from sd_parity.runs.open import open_run

DOC = (Path(__file__).resolve().parent.parent / "docs" / "run-format.md").read_text()
# Runs that together write every pipeline tensor: guided and unguided txt2img, img2img with a stochastic
# sampler (step noise, the posterior), inpainting with a 4-channel (blending) and a 9-channel UNet.
PIPELINE_RUNS = {
    "txt2img": dict(steps=2, negative_prompt="blurry"),
    "txt2img-unguided": dict(steps=3, guidance=1.0),
    "img2img-ddpm": dict(pipeline="img2img", init_image="fixtures/images/init_64.png", strength=0.5, steps=4,
                         scheduler="ddpm"),
    "inpaint-4ch": dict(pipeline="inpaint", init_image="fixtures/images/init_64.png",
                        mask_image="fixtures/images/mask_64.png", strength=0.8, scheduler="pndm", steps=20,
                        capture="pipeline"),
    "inpaint-9ch": dict(model="tiny-sd1-inpaint", pipeline="inpaint", init_image="fixtures/images/init_64.png",
                        mask_image="fixtures/images/mask_64.png", strength=1.0, steps=2),
    "sdxl": dict(model="tiny-sdxl", steps=1, negative_prompt="blurry", capture="pipeline"),  # token_ids_2, add_*
}


def _code(language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", DOC, re.S).group(1)


def _table_rows() -> list[tuple[str, list[str], str]]:
    """(invocation, names, written when) per row of the pipeline-tensor table."""
    table = DOC.split("# Pipeline-level tensors", 1)[1].split("\n\n")[2]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0].strip("`"), re.findall(r"`([^`]+)`", cells[1]), cells[2]))
    return rows


def _check_written_run(folder: Path) -> None:
    with open_run(folder) as run:
        assert [e.key for e in run.entries()] == ["unet/step_000/down_blocks.0[0]", "pipeline/step_000/latents"]
        assert run.metadata == {"impl": "my-port"}
        for entry in run.entries():
            assert entry.dtype == "float32" and entry.shape == (1, 4, 8, 8)
            assert np.array_equal(run.read(entry).reshape(-1), 0.25 * np.arange(256, dtype=np.float32))


@pytest.mark.parametrize("language, compiler, build", [
    ("cpp", "g++", ["g++", "-std=c++17", "-O0", "-o", "{exe}", "{src}"]),
    ("rust", "rustc", ["rustc", "-o", "{exe}", "{src}"]),
])
def test_the_documented_writer_builds_and_writes_a_valid_run(tmp_path, language, compiler, build):
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler} on this machine")
    source = tmp_path / f"run_writer.{'cpp' if language == 'cpp' else 'rs'}"
    source.write_text(_code(language))
    exe = tmp_path / "run_writer"
    subprocess.run([a.format(exe=exe, src=source) for a in build], check=True, capture_output=True, cwd=tmp_path)
    subprocess.run([str(exe), str(tmp_path / "my_run")], check=True)
    _check_written_run(tmp_path / "my_run")


def test_the_pipeline_table_lists_exactly_what_the_reference_writes(reference_run):
    documented = {(invocation, name.split("#")[0]) for invocation, names, _ in _table_rows() for name in names}
    written = set()
    for fields in PIPELINE_RUNS.values():
        with RunReader(reference_run(**fields)) as run:
            written |= {("main" if e.invocation == "main" else "step_NNN", e.name.split("#")[0])
                        for e in run.entries() if e.component == "pipeline"}
    assert documented == written


def test_a_port_writing_what_the_table_says_gets_a_complete_verdict(tmp_path, reference_run, impl_run):
    """A txt2img port following the doc: every row written 'always' or when 'guided', and nothing else."""
    fields = dict(steps=20, capture="pipeline", negative_prompt="blurry")
    reference, candidate = impl_run("torch", **fields)
    wanted = {(inv, name) for inv, names, when in _table_rows() if when in ("always", "guided") for name in names}
    with RunReader(candidate) as run, DirectoryRunWriter(tmp_path / "port", {"impl": "my-port"}) as port:
        for entry in run.entries():
            if ("main" if entry.invocation == "main" else "step_NNN", entry.name) in wanted:
                port.write(entry.component, entry.invocation, entry.name, run.read(entry))
    comparison = compare_runs(reference, tmp_path / "port")
    verdict = make_verdict(comparison)
    assert comparison.coverage.counts["missing"] == 0 and comparison.coverage.counts["extra"] == 0
    assert verdict.status == "parity", verdict.text
    assert comparison.coverage.counts["pass"] == 5 + 20 * 7
