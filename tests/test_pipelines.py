"""impl's pipelines against diffusers', end to end and step by step (tiny-sd1, fixed x_T, recorded noise)."""
import numpy as np
import pytest

from sd_parity.runs.hdf5 import RunReader

SAMPLERS = ["ddim", "pndm", "ddpm", "euler", "euler_ancestral", "lms", "dpmpp_2m"]
STOCHASTIC = {"ddpm", "euler_ancestral"}


def _rel_l2(reference, candidate):
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    return np.linalg.norm(reference - candidate) / np.linalg.norm(reference)


def _final(reader, name):
    steps = [inv for inv in reader.invocations("pipeline") if inv.startswith("step_")]
    return reader.read(f"pipeline/{steps[-1]}/{name}")


def _assert_floors(reference, candidate, backend):
    with RunReader(reference) as ref, RunReader(candidate) as cand:
        assert [e.key for e in ref.entries() if e.key not in cand] == []
        latents_ref, latents_cand = _final(ref, "latents"), _final(cand, "latents")
        image_ref = ref.read("pipeline/main/image_uint8").astype(int)
        image_cand = cand.read("pipeline/main/image_uint8").astype(int)
        if backend == "torch":
            for entry in ref.entries():
                assert np.array_equal(ref.read(entry), cand.read(entry.key)), entry.key
        else:
            assert _rel_l2(latents_ref, latents_cand) <= 1e-4
            assert np.abs(image_ref - image_cand).max() <= 1
            assert (image_ref == image_cand).mean() >= 0.999


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_free_running_20_steps(impl_run, sampler, backend):
    reference, candidate = impl_run(backend, scheduler=sampler, steps=20, capture="pipeline",
                                    negative_prompt="blurry")
    _assert_floors(reference, candidate, backend)
    if sampler in STOCHASTIC:
        with RunReader(reference) as ref:
            assert "pipeline/step_000/noise" in ref  # the draw was recorded, and the impl replayed it


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_step_fed_the_reference_latents(impl_run, sampler):
    reference, isolated = impl_run("numpy", isolated=True, scheduler=sampler, steps=20, capture="pipeline")
    with RunReader(reference) as ref, RunReader(isolated) as iso:
        steps = [inv for inv in ref.invocations("pipeline") if inv.startswith("step_")]
        assert len(steps) >= 20
        for step in steps:
            for name in ("step_output", "noise_pred", "latent_model_input"):
                key = f"pipeline/{step}/{name}"
                assert _rel_l2(ref.read(key), iso.read(key)) <= 1e-6, key


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("case", [
    dict(pipeline="img2img", init_image="fixtures/images/init_64.png", strength=0.6, scheduler="ddim"),
    dict(pipeline="img2img", init_image="fixtures/images/init_64.png", strength=0.75, scheduler="euler_ancestral"),
    dict(pipeline="inpaint", init_image="fixtures/images/init_64.png", mask_image="fixtures/images/mask_64.png",
         strength=0.8, scheduler="pndm"),
    dict(model="tiny-sd1-inpaint", pipeline="inpaint", init_image="fixtures/images/init_64.png",
         mask_image="fixtures/images/mask_64.png", strength=1.0, scheduler="ddim"),
], ids=["img2img-ddim", "img2img-euler_ancestral", "inpaint_blend-pndm", "inpaint_9ch-ddim"])
def test_img2img_and_inpainting_end_to_end(impl_run, backend, case):
    reference, candidate = impl_run(backend, steps=20, capture="pipeline", **case)
    _assert_floors(reference, candidate, backend)


def test_several_prompts_and_images_per_prompt(impl_run):
    reference, candidate = impl_run("torch", steps=3, prompt=["a red cube", "a blue ball"], negative_prompt="blurry",
                                    images_per_prompt=2, capture="pipeline")
    _assert_floors(reference, candidate, "torch")
    with RunReader(reference) as ref:
        assert ref.entry("pipeline/main/image").shape[0] == 4


def test_guidance_one_skips_the_unconditional_pass(impl_run):
    reference, candidate = impl_run("torch", steps=3, guidance=1.0)
    _assert_floors(reference, candidate, "torch")
    with RunReader(reference) as ref, RunReader(candidate) as cand:
        for reader in (ref, cand):
            assert reader.invocations("text_encoder") == ["call_0"]
            assert "pipeline/main/negative_token_ids" not in reader
            assert reader.entry("unet/step_000/@sample").shape[0] == 1
