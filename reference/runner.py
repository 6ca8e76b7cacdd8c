"""Runs the real diffusers StableDiffusionPipeline with capture hooks and writes a run file."""
from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from parity.capture_spec import CaptureSpec
from parity.recorder import Recorder
from parity.runconfig import RunConfig, run_metadata
from parity.runfile import RunWriter

from .hooks import capture_module

TORCH_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


def scheduler_for(name: str, base_config, karras: bool = False):
    """The diffusers scheduler behind each sampler name, built from the model's scheduler config."""
    import diffusers

    classes = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "pndm": (diffusers.PNDMScheduler, {}),
        "ddpm": (diffusers.DDPMScheduler, {}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "lms": (diffusers.LMSDiscreteScheduler, {}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    }
    cls, overrides = classes[name]
    if karras:
        overrides = {**overrides, "use_karras_sigmas": True}
    return cls.from_config(base_config, **overrides)


def load_pipeline(model_dir: Path, dtype: str, device: str = "cpu"):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Load-time chatter (progress bars, optional-component notices) would bury the capture's own output.
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), dtype=TORCH_DTYPES[dtype], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, local_files_only=True)
    return pipe.to(device)


@contextmanager
def _recording_noise(recorder: Recorder, scheduler) -> Iterator[None]:
    """Record every noise tensor the scheduler draws, so an implementation can consume the same draws."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:
        yield
        return

    def recording(*args, **kwargs):
        noise = original(*args, **kwargs)
        recorder.pipeline("noise", noise, step=recorder.step)
        return noise

    module.randn_tensor = recording
    try:
        yield
    finally:
        module.randn_tensor = original


@contextmanager
def _pipeline_taps(recorder: Recorder, pipe, guided: bool) -> Iterator[None]:
    """Pipeline-level tensors: token ids, per-step model input, noise predictions, latents; the decode."""
    scheduler, vae = pipe.scheduler, pipe.vae
    text_calls = [0]

    def on_text_encoder(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        role = "token_ids" if text_calls[0] == 0 else "negative_token_ids"
        text_calls[0] += 1
        recorder.pipeline(role, ids)

    def on_unet_input(module, args, kwargs):
        recorder.step += 1
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        recorder.pipeline("latent_model_input", sample, step=recorder.step)
        recorder.pipeline("timestep", torch.as_tensor(timestep).reshape(-1)[:1], step=recorder.step)

    def on_unet_output(module, args, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        if guided:
            uncond, text = sample.chunk(2)
            recorder.pipeline("noise_pred_uncond", uncond, step=recorder.step)
            recorder.pipeline("noise_pred_text", text, step=recorder.step)

    original_step, original_decode = scheduler.step, vae.decode

    def step(model_output, timestep, sample, *args, **kwargs):
        recorder.pipeline("noise_pred", model_output, step=recorder.step)
        result = original_step(model_output, timestep, sample, *args, **kwargs)
        prev = result[0] if isinstance(result, tuple) else result.prev_sample
        recorder.pipeline("latents", prev, step=recorder.step)
        return result

    def decode(z, *args, **kwargs):
        with recorder.invocation("vae_decoder"):
            recorder.module_inputs("vae_decoder", "", {"z": z})
            result = original_decode(z, *args, **kwargs)
            recorder.module_output("vae_decoder", "", result)
        return result

    handles = [
        pipe.text_encoder.register_forward_pre_hook(on_text_encoder, with_kwargs=True),
        pipe.unet.register_forward_pre_hook(on_unet_input, with_kwargs=True),
        pipe.unet.register_forward_hook(on_unet_output),
    ]
    scheduler.step, vae.decode = step, decode
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        del scheduler.step, vae.decode  # drop the instance overrides, exposing the class methods again


def run_reference(config: RunConfig, output: Path, progress: bool = True) -> Path:
    """Run diffusers' StableDiffusionPipeline for `config`, capturing into the run file `output`."""
    model_dir = config.model_dir()
    pipe = load_pipeline(model_dir, config.dtype, config.device)
    pipe.scheduler = scheduler_for(config.scheduler, pipe.scheduler.config, config.karras)
    pipe.set_progress_bar_config(disable=not progress, desc=f"reference {config.dtype}", leave=False)
    x_t = config.initial_noise(latent_channels=pipe.vae.config.latent_channels, scale=pipe.vae_scale_factor)
    spec = CaptureSpec.parse(config.capture_spec(sum(p.numel() for p in pipe.unet.parameters())))
    metadata = run_metadata(config, impl="reference", model_dir=model_dir, x_t=x_t,
                            scheduler_config=dict(pipe.scheduler.config))
    guided = config.guidance > 1.0
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    with RunWriter(output, metadata, compression=config.compression) as writer:
        recorder = Recorder(writer, spec, total_steps=config.steps)
        recorder.pipeline("x_T", x_t)
        with ExitStack() as stack:
            stack.enter_context(capture_module(recorder, "text_encoder", pipe.text_encoder))
            stack.enter_context(capture_module(recorder, "unet", pipe.unet))
            stack.enter_context(capture_module(recorder, "vae_decoder", pipe.vae,
                                               include=("post_quant_conv", "decoder"), invocation_root=False))
            stack.enter_context(_pipeline_taps(recorder, pipe, guided))
            stack.enter_context(_recording_noise(recorder, pipe.scheduler))
            with torch.inference_mode():
                result = pipe(
                    prompt=config.prompts(), negative_prompt=config.negative_prompts(),
                    num_inference_steps=config.steps, guidance_scale=config.guidance, eta=config.eta,
                    height=config.height, width=config.width, generator=generator,
                    latents=torch.from_numpy(x_t).to(config.device, TORCH_DTYPES[config.dtype]),
                    num_images_per_prompt=config.images_per_prompt, output_type="np")
        image = np.asarray(result.images, dtype=np.float32)
        recorder.pipeline("image", image)
        recorder.pipeline("image_uint8", (image * 255).round().astype(np.uint8))
    return output
