"""SD 2.x and SDXL through the whole harness: `parity run --model tiny-sd2|tiny-sdxl` end to end.

The reference is the family's own diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline,
StableDiffusionXLImg2ImgPipeline) with the capture hooks the registry names (both text encoders, each
embedder's token ids, SDXL's added conditions); impl's torch backend must reproduce every captured tensor
bit for bit at fp32, free-running and in isolated mode, and the verdict, the pytest ids and the model
check must name the family's components. The NumPy backend and half precision run in `make test-all`.
"""
import json
import shutil

import numpy as np
import pytest

from sd_parity.cases.case import Case, run_case
from sd_parity.cli import main
from sd_parity.cli.suite import family_cases, fault_cases, suite_cases
from sd_parity.fixtures import IMAGES_DIR, ensure_fixture, fixture_family
from sd_parity.runs.open import open_run
from sd_parity.runs.config import RunConfig

BASE = dict(steps=2, prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry")


def _case(tmp_path, model, backend, **fields):
    return run_case(Case(RunConfig(**{**BASE, "model": model, **fields}), backend), tmp_path / "case")


def _not_identical(reference, candidate) -> list[str]:
    ref, cand = open_run(reference), open_run(candidate)
    shared = {e.key for e in ref.entries()} & {e.key for e in cand.entries()}
    return [key for key in sorted(shared) if not np.array_equal(np.asarray(ref.read(key)), np.asarray(cand.read(key)),
                                                                 equal_nan=True)]


@pytest.mark.parametrize("model, pipeline", [("tiny-sd2", "txt2img"), ("tiny-sdxl", "txt2img"),
                                             ("tiny-sdxl", "img2img")])
def test_torch_backend_is_identical_at_fp32(tmp_path, model, pipeline):
    images = dict(init_image=str(IMAGES_DIR / "init_64.png"), strength=0.7) if pipeline == "img2img" else {}
    result = _case(tmp_path, model, "torch", pipeline=pipeline, scheduler="euler_ancestral", **images)
    assert result.summary["verdict"]["status"] == "parity", result.summary["verdict"]["text"]
    for mode in ("candidate", "isolated"):
        assert _not_identical(result.runs["reference"], result.runs[mode]) == [], mode
    family = fixture_family(model)
    reference = open_run(result.runs["reference"])
    components = {e.component for e in reference.entries()}
    assert set(family.component_names) - {"vae_encoder" if pipeline == "txt2img" else ""} <= components
    pipeline_tensors = {e.key.split("/")[-1] for e in reference.entries() if e.component == "pipeline"}
    for embedder in family.conditioning.embedders:  # each encoder's prompt and negative prompt
        assert {embedder.token_ids, "negative_" + embedder.token_ids} <= pipeline_tensors
    if family.conditioning.added is not None:
        assert {"add_text_embeds", "add_time_ids"} <= pipeline_tensors
        time_ids = reference.read("pipeline/main/add_time_ids")
        assert time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # (original, crop, target), both halves
    # every block of every component is a test case under its registry stem (text_encoder_2_block_0, ...)
    ids = {block["id"] for block in result.summary["blocks"]}
    for component in family.components:
        if component.name in components:
            assert any(i.startswith(component.test_stem + "_block_") for i in ids), component.name


def test_sdxl_without_negative_prompt_zeroes_it(tmp_path):
    """force_zeros_for_empty_prompt: no negative token ids in either run, and still identical."""
    result = _case(tmp_path, "tiny-sdxl", "torch", negative_prompt=None, steps=1)
    assert result.summary["verdict"]["status"] == "parity", result.summary["verdict"]["text"]
    names = {e.key.split("/")[-1] for e in open_run(result.runs["reference"]).entries() if e.component == "pipeline"}
    assert {"token_ids", "token_ids_2"} <= names and not any(n.startswith("negative_") for n in names)
    assert _not_identical(result.runs["reference"], result.runs["candidate"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize("backend, dtype", [("numpy", "fp32"), ("numpy", "fp16"), ("numpy", "bf16"),
                                            ("torch", "fp16"), ("torch", "bf16")])
def test_family_runs_at_parity(tmp_path, model, backend, dtype):
    result = _case(tmp_path, model, backend, dtype=dtype)
    assert result.summary["verdict"]["status"] == "parity", result.summary["verdict"]["text"]


def test_a_model_folder_needs_its_family_parts(tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(ensure_fixture("tiny-sdxl"), folder)
    shutil.rmtree(folder / "text_encoder_2")
    assert main(["capture", "--model", str(folder), "--output", str(tmp_path / "r.h5")]) == 2
    assert "lacks text_encoder_2" in capsys.readouterr().err
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    assert main(["capture", "--model", str(folder), "--output", str(tmp_path / "r.h5")]) == 2
    assert "not a diffusers folder of a known family" in capsys.readouterr().err


def test_suite_has_family_cases_and_family_faults_only_where_they_apply():
    cases = family_cases()
    assert {(c.config.model, c.config.dtype, c.candidate) for c in cases} == {
        (m, d, b) for m, ds in (("tiny-sd2", ("fp32", "bf16")), ("tiny-sdxl", ("fp32", "fp16")))
        for d in ds for b in ("torch", "numpy")}
    everything = suite_cases() + cases
    names = [c.name for c in everything]
    assert len(set(names)) == len(names), "two suite cases would write one report folder"
    assert {c.config.model for c in fault_cases(everything, "add_time_ids_order")} == {"tiny-sdxl"}
    assert fault_cases(everything, "groupnorm_eps") == everything
