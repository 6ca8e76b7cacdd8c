"""impl's SD 2.x and SDXL pipelines end to end against diffusers' StableDiffusionPipeline,
StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline, driven directly here (tiny-sd2, tiny-sdxl).

Both sides start from the same x_T; every random draw of the reference (the sampler's, the VAE
posterior's, img2img's add-noise draw) is served from arrays that impl's request is given too. Per
step, the noise prediction entering the sampler and the latents leaving it are compared, and SDXL's
added conditions (add_text_embeds, add_time_ids) as they enter the UNet, and the image. Floors at fp32
as for SD 1.x (tests/test_pipelines.py): torch bit-identical; NumPy final latents within relative L2
1e-4, uint8 image within 1 level and >= 99.9% equal. At fp16/bf16 impl's samplers apply float32
coefficients to half-precision latents, where diffusers' schedulers round some to the latents' dtype
(DDIM's left-hand 0-dim factors, add_noise's alphas) or upcast (Euler): there the added conditions
and (txt2img, torch) the first noise prediction are bit-identical, the final latents and the image
within the dtype's unit floor (relative L2 1e-2 fp16, 6e-2 bf16; docs/precision.md).
"""
from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from sd_parity.fixtures import IMAGES_DIR, ensure_fixture
from sd_parity.impl.errors import ModelInputError
from sd_parity.impl.images import to_uint8
from sd_parity.impl.pipeline import Observer, Request, StableDiffusion
from sd_parity.impl.samplers import SAMPLERS
from sd_parity.runs.recorder import to_numpy
from test_impl_families import NEGATIVE, PROMPT, diffusers_pipeline
from unit_parity import rel_l2

STEPS = 6
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}

CASES = {
    # SD 2.x's own scheduler config: DDIM, v-prediction
    "sd2-ddim": dict(fixture="tiny-sd2", sampler="ddim"),
    # zero terminal SNR with trailing timesteps and rescaled guidance, the paper's recipe, on a v model
    # (torch only: NumPy's correctly rounded square root moves the rescaled schedule's first sigma, 4096, by
    # ~1e-6, which reaches the image; tests/test_samplers.py bounds NumPy's zero-SNR steps)
    "sd2-euler-zero_snr-rescale": dict(fixture="tiny-sd2", sampler="euler", scheduler=ZERO_SNR, guidance_rescale=0.7,
                                       backends=("torch",)),
    "sd2-euler_ancestral": dict(fixture="tiny-sd2", sampler="euler_ancestral"),
    # SDXL's own scheduler (Euler); no negative prompt: force_zeros_for_empty_prompt zeroes the negative half
    "sdxl-euler-zeros": dict(fixture="tiny-sdxl", sampler="euler", negative=None),
    "sdxl-dpmpp_2m-rescale": dict(fixture="tiny-sdxl", sampler="dpmpp_2m", guidance_rescale=0.5),
    "sdxl-img2img-euler_ancestral": dict(fixture="tiny-sdxl", sampler="euler_ancestral", kind="img2img", strength=0.6),
    # half precision: SDXL's VAE decodes (force_upcast, fp16) and encodes (img2img, bf16) at float32
    "sdxl-ddim-fp16": dict(fixture="tiny-sdxl", sampler="ddim", dtype="fp16"),
    "sdxl-img2img-ddim-bf16": dict(fixture="tiny-sdxl", sampler="ddim", kind="img2img", strength=0.75, dtype="bf16"),
}
HALF_FLOORS = {"fp16": 1e-2, "bf16": 6e-2}
PARAMS = [pytest.param(name, backend, id=f"{name}-{backend}") for name, case in CASES.items()
          for backend in case.get("backends", ("torch", "numpy"))]


def _case(name: str) -> dict:
    return {"negative": NEGATIVE, "scheduler": {}, "guidance_rescale": 0.0, "kind": "txt2img", "dtype": "fp32",
            "strength": 1.0, **CASES[name]}


def _init_image():
    from PIL import Image

    return Image.open(Path(IMAGES_DIR) / "init_64.png").convert("RGB")


class _Draws:
    """The random draws of a run, made once and handed to both sides: x_T (also img2img's add-noise
    draw), the VAE posterior's noise, and the sampler's draws, in order."""

    def __init__(self):
        rng = np.random.default_rng(7)
        self.x_t = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        self.posterior = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        self.steps = [rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(STEPS + 1)]

    def impl_noise(self, kind: str, index: int, shape: tuple) -> np.ndarray:
        return self.posterior if kind == "posterior" else self.steps[index]


def run_diffusers(case: dict, draws: _Draws) -> dict:
    """(name, step) -> array of the reference run, and ("image", None)."""
    import diffusers
    import torch

    pipe = diffusers_pipeline(case["fixture"], case["dtype"], case["kind"])
    reference_class, overrides = SAMPLERS[case["sampler"]].reference
    pipe.scheduler = getattr(diffusers, reference_class).from_config(pipe.scheduler.config, **overrides,
                                                                     **case["scheduler"])
    dtype = pipe.unet.dtype
    tensors: dict = {}
    step_calls = iter(range(1000))
    sampler_step = pipe.scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        tensors[("noise_pred", next(step_calls))] = to_numpy(model_output)
        return sampler_step(model_output, timestep, sample, *args, **kwargs)

    def on_step_end(pipe_, index, timestep, values):
        tensors[("latents", index)] = to_numpy(values["latents"])
        for name in ("add_text_embeds", "add_time_ids"):
            if name in values and index == 0:
                tensors[(name, None)] = to_numpy(values[name])
        return {}

    served = iter(draws.steps)
    sources = {type(pipe).__module__: lambda *a, **k: torch.from_numpy(draws.x_t).to(dtype),
               type(pipe.scheduler).__module__: lambda shape, **k: torch.from_numpy(next(served)).to(k.get("dtype")),
               "diffusers.models.autoencoders.vae": lambda shape, **k: torch.from_numpy(draws.posterior).to(k.get("dtype"))}
    arguments = dict(prompt=PROMPT, negative_prompt=case["negative"], num_inference_steps=STEPS, guidance_scale=7.5,
                     output_type="np", callback_on_step_end=on_step_end,
                     callback_on_step_end_tensor_inputs=[n for n in ("latents", "add_text_embeds", "add_time_ids")
                                                         if n in pipe._callback_tensor_inputs])
    if case["guidance_rescale"]:
        arguments["guidance_rescale"] = case["guidance_rescale"]
    if case["kind"] == "img2img":
        arguments.update(image=_init_image(), strength=case["strength"])
    else:
        arguments.update(latents=torch.from_numpy(draws.x_t).to(dtype))
    with ExitStack() as stack, torch.inference_mode():
        for module, source in sources.items():
            if hasattr(sys.modules[module], "randn_tensor"):
                stack.enter_context(mock.patch.object(sys.modules[module], "randn_tensor", source))
        stack.enter_context(mock.patch.object(pipe.scheduler, "step", step))
        tensors[("image", None)] = np.asarray(pipe(**arguments).images, dtype=np.float32)
    return tensors


class _Collect(Observer):
    def __init__(self):
        self.tensors: dict = {}

    def tensor(self, name, value, step=None):
        self.tensors[(name, step)] = to_numpy(value)


def run_impl(case: dict, backend: str, draws: _Draws) -> dict:
    sd = StableDiffusion.from_folder(ensure_fixture(case["fixture"]), backend=backend, dtype=case["dtype"])
    sd.scheduler_config = {**sd.scheduler_config, **case["scheduler"]}
    observer = _Collect()
    image = _init_image() if case["kind"] == "img2img" else None
    request = Request(prompt=PROMPT, negative_prompt=case["negative"], steps=STEPS, sampler=case["sampler"],
                      guidance=7.5, guidance_rescale=case["guidance_rescale"], x_T=draws.x_t, height=64, width=64,
                      init_image=image, strength=case["strength"], noise=draws.impl_noise)
    observer.tensors[("image", None)] = sd(request, observer)
    return observer.tensors


@pytest.mark.parametrize("name, backend", PARAMS)
def test_pipeline_matches_diffusers(name, backend):
    case, draws = _case(name), _Draws()
    reference = run_diffusers(case, draws)
    mine = run_impl(case, backend, draws)
    steps = sorted(step for (tensor, step) in reference if tensor == "latents")
    assert steps == list(range(len(steps))) and len(steps) == (STEPS if case["kind"] == "txt2img" else int(STEPS * case["strength"]))
    compared = [key for key in reference if key[0] in ("noise_pred", "latents", "add_text_embeds", "add_time_ids", "image")]
    assert (("add_time_ids", None) in compared) == (case["fixture"] == "tiny-sdxl")
    half = case["dtype"] != "fp32"
    exact = [key for key in compared if not half or key[0].startswith("add_")
             or (key == ("noise_pred", 0) and case["kind"] == "txt2img")]
    for key in compared:
        assert key in mine, f"impl has no {key}"
        assert mine[key].shape == reference[key].shape and mine[key].dtype == reference[key].dtype, key
        if backend == "torch" and key in exact:
            assert np.array_equal(mine[key], reference[key]), f"{key}: max |d| {np.abs(mine[key] - reference[key]).max()}"
    if half:
        for key in (("latents", steps[-1]), ("image", None)):
            assert rel_l2(reference[key], mine[key]) <= HALF_FLOORS[case["dtype"]], key
    elif backend == "numpy":
        final = ("latents", steps[-1])
        assert rel_l2(reference[final], mine[final]) <= 1e-4
        image_ref, image_mine = (to_uint8(t[("image", None)]).astype(int) for t in (reference, mine))
        assert np.abs(image_ref - image_mine).max() <= 1 and (image_ref == image_mine).mean() >= 0.999


def test_sdxl_zero_negative_is_zeros_and_not_encoded():
    """force_zeros_for_empty_prompt: without a negative prompt, neither text encoder runs on one and the
    unconditional halves of the context and pooled embeds are zeros; model_index.json can turn it off."""
    sd = StableDiffusion.from_folder(ensure_fixture("tiny-sdxl"), backend="numpy")
    calls: list[str] = []

    class Count(_Collect):
        def component(self, name):
            calls.append(name)
            return super().component(name)

    observer = Count()
    request = Request(prompt=PROMPT, steps=1, sampler="euler", x_T=_Draws().x_t, height=64, width=64)
    sd(request, observer)
    assert calls.count("text_encoder") == 1 and calls.count("text_encoder_2") == 1
    assert not observer.tensors[("add_text_embeds", None)][0].any()
    assert observer.tensors[("add_text_embeds", None)][1].any()
    assert ("negative_token_ids_2", None) not in observer.tensors
    sd.force_zeros_for_empty_prompt = False
    calls.clear()
    sd(request, observer)
    assert calls.count("text_encoder_2") == 2 and ("negative_token_ids_2", None) in observer.tensors


def test_add_time_ids_follow_the_registry_order():
    sd = StableDiffusion.from_folder(ensure_fixture("tiny-sdxl"), backend="numpy")
    assert sd.add_time_ids((96, 80), (8, 4), (64, 48)) == [96.0, 80.0, 8.0, 4.0, 64.0, 48.0]
    observer = _Collect()
    sd(Request(prompt=PROMPT, steps=1, sampler="euler", x_T=_Draws().x_t, height=64, width=64,
               original_size=(96, 80), crops_coords_top_left=(8, 4), guidance=1.0), observer)
    assert observer.tensors[("add_time_ids", None)].tolist() == [[96.0, 80.0, 8.0, 4.0, 64.0, 64.0]]


@pytest.mark.parametrize("request_fields, message", [
    (dict(init_image="image", mask="image"), "SDXL has no inpaint pipeline"),
    (dict(guidance_rescale=0.5, init_image="image"), None),
])
def test_sdxl_pipelines_left_out_are_refused(request_fields, message):
    sd = StableDiffusion.from_folder(ensure_fixture("tiny-sdxl"), backend="numpy")
    fields = {k: (_init_image() if v == "image" else v) for k, v in request_fields.items()}
    request = Request(prompt=PROMPT, steps=2, sampler="euler", x_T=_Draws().x_t, height=64, width=64, strength=0.5,
                      **fields)
    if message is None:  # SDXL img2img has guidance_rescale
        assert sd(request).shape == (1, 64, 64, 3)
    else:
        with pytest.raises(ModelInputError, match=message):
            sd(request)


def test_guidance_rescale_outside_its_pipelines_is_refused():
    sd = StableDiffusion.from_folder(ensure_fixture("tiny-sd2"), backend="numpy")
    request = Request(prompt=PROMPT, steps=2, x_T=_Draws().x_t, height=64, width=64, init_image=_init_image(),
                      strength=0.5, guidance_rescale=0.7)
    with pytest.raises(ModelInputError, match="guidance_rescale is not part of SD 2.x's img2img"):
        sd(request)
