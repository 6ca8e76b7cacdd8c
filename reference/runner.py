"""Runs the real diffusers pipeline of the model's family (StableDiffusion*, StableDiffusionXL*) with
capture hooks and writes a run file. What is hooked comes from the family registry
(sd_parity.impl.families): each component's module and subtrees, each text embedder's token ids."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sd_parity.runs.selection import CaptureSpec
from sd_parity.runs.naming import with_call_index
from sd_parity.runs.recorder import Recorder
from sd_parity.runs.config import RunConfig, run_metadata, unet_parameter_count
from sd_parity.runs.hdf5 import RunWriter
from sd_parity.devices import prepare as prepare_device
from sd_parity.errors import BadInput
from sd_parity.impl.families import Family, detect_family
from sd_parity.threads import pin_torch

from sd_parity.candidates.hooks import hook_module
from sd_parity.candidates.sinks import RecorderSink
from .oracle import TORCH_DTYPES, ResidentNetworks, exact_time_embedding

# Captured tensors waiting for the disk; bounds the memory that overlapping I/O with compute costs
# (about twice SD 1.5's largest activation, the 84 MB GEGLU projection at 64x64 latents, batch 2).
WRITE_QUEUE_BYTES = 192 << 20


def scheduler_for(name: str, base_config, karras: bool = False):
    """The diffusers scheduler behind each sampler name (the sampler's `reference` class and overrides,
    sd_parity.impl.samplers), built from the model's scheduler config."""
    import diffusers

    from sd_parity.impl.samplers import SAMPLERS

    class_name, overrides = SAMPLERS[name].reference
    if karras:
        overrides = {**overrides, "use_karras_sigmas": True}
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


# Optional parts switched off where the family's pipeline has them: no safety checker, no watermark
# (it would change the image after the captured decoder output).
_PIPELINE_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
                     "add_watermarker": False}


def pipeline_class(model_dir: Path, kind: str = "txt2img"):
    """The diffusers pipeline class for `kind` of the folder's family."""
    import diffusers

    family = detect_family(model_dir)
    if kind not in family.pipelines:
        raise BadInput(f"{family.title} has no {kind} pipeline; it has {', '.join(family.pipelines)}")
    return getattr(diffusers, family.pipelines[kind])


def _quiet_loading() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Load-time chatter (progress bars, optional-component notices) would bury the capture's own output.
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _from_pretrained(model_dir: Path, dtype: str, kind: str, **components):
    _quiet_loading()
    cls = pipeline_class(model_dir, kind)
    accepted = inspect.signature(cls.__init__).parameters
    options = {name: value for name, value in _PIPELINE_OPTIONS.items() if name in accepted}
    return cls.from_pretrained(str(model_dir), dtype=TORCH_DTYPES[dtype], local_files_only=True,
                               **options, **components)


def load_pipeline(model_dir: Path, dtype: str, device: str = "cpu", kind: str = "txt2img",
                  networks: ResidentNetworks | None = None):
    """The diffusers pipeline for a model folder; with `networks`, built around its released networks
    (weights loaded one network at a time while the pipeline runs, see reference.oracle)."""
    components = {name: networks.released(name) for name in networks.names} if networks is not None else {}
    return _from_pretrained(model_dir, dtype, kind, **components).to(device)


def load_network(model_dir: Path, network: str, dtype: str, device: str = "cpu"):
    """One network (a component folder: text_encoder, text_encoder_2, unet or vae) loaded by diffusers'
    pipeline loader, the family's other networks and its tokenizers skipped."""
    family = detect_family(model_dir)
    skipped = {name: None for name in (*family.folders, *family.tokenizers) if name != network}
    return getattr(_from_pretrained(model_dir, dtype, "txt2img", **skipped), network).to(device)


@contextmanager
def _patched_randn(module_name: str, replacement) -> Iterator[None]:
    """Swap `randn_tensor` in one diffusers module; `replacement(original, *args, **kwargs)` decides."""
    module = sys.modules[module_name]
    original = getattr(module, "randn_tensor", None)
    if original is None:  # this module draws no noise (deterministic samplers)
        yield
        return
    module.randn_tensor = lambda *args, **kwargs: replacement(original, *args, **kwargs)
    try:
        yield
    finally:
        module.randn_tensor = original


def _draw_in_float32(original, *args, dtype=None, **kwargs):
    """One draw from the run's generator, made in float32 and cast to the run's dtype.

    torch's CPU normal sampler consumes its generator differently per dtype, so drawing in the run's
    dtype would give an fp64 oracle (or an fp16 run) other noise than the fp32 run of the same seed;
    float32 is what diffusers draws for the usual fp32 pipeline, so that run is unchanged."""
    noise = original(*args, dtype=torch.float32, **kwargs)
    return noise if dtype is None else noise.to(dtype)


@contextmanager
def _noise_sources(recorder: Recorder, pipe, x_t: torch.Tensor) -> Iterator[None]:
    """Every random draw of the run, made reproducible for any implementation.

    The pipeline's own draw (initial noise of img2img/inpainting) is served from the fixed x_T file;
    the sampler's and the VAE posterior's draws are recorded, so an implementation consumes them
    instead of having to reproduce torch's RNG.
    """
    def serve_x_t(original, shape, *args, **kwargs):
        if tuple(shape) != tuple(x_t.shape):
            raise RuntimeError(f"pipeline drew noise of shape {tuple(shape)}; x_T has {tuple(x_t.shape)}")
        return x_t.clone()

    def record_step_noise(original, *args, **kwargs):
        noise = _draw_in_float32(original, *args, **kwargs)
        recorder.pipeline("noise", noise, step=recorder.step)
        return noise

    posterior_draws = [0]

    def record_posterior_noise(original, *args, **kwargs):
        noise = _draw_in_float32(original, *args, **kwargs)
        recorder.pipeline(with_call_index("posterior_noise", posterior_draws[0]), noise)
        posterior_draws[0] += 1
        return noise

    with ExitStack() as stack:
        stack.enter_context(_patched_randn(type(pipe).__module__, serve_x_t))
        stack.enter_context(_patched_randn(type(pipe.scheduler).__module__, record_step_noise))
        stack.enter_context(_patched_randn("diffusers.models.autoencoders.vae", record_posterior_noise))
        yield


@contextmanager
def _pipeline_taps(recorder: Recorder, pipe, family: Family, guided: bool) -> Iterator[None]:
    """Pipeline-level tensors: each text embedder's token ids, the UNet's added conditions, per-step
    model input, noise predictions, latents; VAE calls."""
    scheduler, vae = pipe.scheduler, pipe.vae

    def on_text_encoder(embedder):
        calls = [0]  # the prompt's call, then the negative prompt's

        def record(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            recorder.pipeline(("negative_" if calls[0] else "") + embedder.token_ids, ids)
            calls[0] += 1
        return record

    def on_unet_input(module, args, kwargs):
        recorder.step += 1
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        added = kwargs.get("added_cond_kwargs")
        if added and recorder.step == 0:  # the same every step (SDXL's pooled embeds and add_time_ids)
            for name in ("text_embeds", "time_ids"):
                recorder.pipeline(f"add_{name}", added[name])
        recorder.pipeline("latent_model_input", sample, step=recorder.step)
        recorder.pipeline("timestep", torch.as_tensor(timestep).reshape(-1)[:1], step=recorder.step)

    def on_unet_output(module, args, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        if guided:
            uncond, text = sample.chunk(2)
            recorder.pipeline("noise_pred_uncond", uncond, step=recorder.step)
            recorder.pipeline("noise_pred_text", text, step=recorder.step)

    originals = {"step": scheduler.step, "add_noise": scheduler.add_noise, "decode": vae.decode, "encode": vae.encode}

    # The wrappers keep the wrapped methods' signatures (functools.wraps sets __wrapped__, which
    # inspect.signature follows): diffusers' prepare_extra_step_kwargs inspects scheduler.step for
    # `eta` and `generator`, and would silently drop both for a bare (*args, **kwargs) wrapper.
    @functools.wraps(originals["step"])
    def step(model_output, timestep, sample, *args, **kwargs):
        recorder.pipeline("noise_pred", model_output, step=recorder.step)
        result = originals["step"](model_output, timestep, sample, *args, **kwargs)
        prev = result[0] if isinstance(result, tuple) else result.prev_sample
        recorder.pipeline("step_output", prev, step=recorder.step)
        return result

    @functools.wraps(originals["add_noise"])
    def add_noise(original_samples, noise, timesteps):
        result = originals["add_noise"](original_samples, noise, timesteps)
        step_index = None if recorder.step < 0 else recorder.step
        recorder.pipeline("add_noise_original", original_samples, step=step_index)
        recorder.pipeline("add_noise_output", result, step=step_index)
        return result

    def coder(component: str, method: str, argument: str):
        @functools.wraps(originals[method])
        def call(x, *args, **kwargs):
            with recorder.invocation(component):
                recorder.module_inputs(component, "", {argument: x})
                result = originals[method](x, *args, **kwargs)
                recorder.module_output(component, "", _posterior_parameters(result))
            return result
        return call

    handles = [
        *(getattr(pipe, family.component(embedder.component).folder).register_forward_pre_hook(
            on_text_encoder(embedder), with_kwargs=True) for embedder in family.conditioning.embedders),
        pipe.unet.register_forward_pre_hook(on_unet_input, with_kwargs=True),
        pipe.unet.register_forward_hook(on_unet_output),
    ]
    scheduler.step, scheduler.add_noise = step, add_noise
    vae.decode, vae.encode = coder("vae_decoder", "decode", "z"), coder("vae_encoder", "encode", "x")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        # Drop the instance overrides, exposing the class methods again.
        del scheduler.step, scheduler.add_noise, vae.decode, vae.encode


def _posterior_parameters(result):
    """An encode result carries a distribution object; its tensors are what can be compared."""
    dist = getattr(result, "latent_dist", None)
    if dist is None and isinstance(result, tuple) and hasattr(result[0], "logvar"):
        dist = result[0]
    return {"mean": dist.mean, "logvar": dist.logvar} if dist is not None else result


def _step_end_callback(recorder: Recorder, kind: str):
    def callback(pipe, index, timestep, tensors):
        recorder.pipeline("latents", tensors["latents"], step=recorder.step)
        if kind == "inpaint" and index == 0:
            recorder.pipeline("mask", tensors["mask"])
            recorder.pipeline("masked_image_latents", tensors["masked_image_latents"])
        return {}
    return callback


def _call_arguments(config: RunConfig, x_t: torch.Tensor) -> dict:
    arguments = dict(prompt=config.prompts(), negative_prompt=config.negative_prompts(),
                     num_inference_steps=config.steps, guidance_scale=config.guidance, eta=config.eta,
                     num_images_per_prompt=config.images_per_prompt, output_type="np")
    if config.pipeline == "txt2img":
        return {**arguments, "height": config.height, "width": config.width, "latents": x_t}
    image, mask = config.load_images()
    arguments.update(image=image, strength=config.strength)
    if config.pipeline == "inpaint":
        arguments.update(mask_image=mask, height=config.height, width=config.width,
                         callback_on_step_end_tensor_inputs=["latents", "mask", "masked_image_latents"])
    return arguments


def run_reference(config: RunConfig, output: Path, progress: bool = True, oracle: bool = False) -> Path:
    """Run the diffusers pipeline for `config`, capturing into the run file `output`, with one network's
    weights in memory at a time. `oracle`: the fp64 oracle of `config` (every tensor in float64, the
    time embedding included, which diffusers computes in float32 otherwise)."""
    if oracle:
        config = dataclasses.replace(config, dtype="fp64")
    model_dir = config.model_dir()
    family = detect_family(model_dir)
    prepare_device(config.device)
    pin_torch()
    networks = ResidentNetworks(model_dir, config.dtype,
                                lambda name, dtype: load_network(model_dir, name, dtype, config.device))
    pipe = load_pipeline(model_dir, config.dtype, config.device, config.pipeline, networks)
    if oracle and getattr(pipe.vae.config, "force_upcast", False):
        # float64 throughout: SDXL's pipeline would encode (img2img) at float32 in an fp64 run
        pipe.vae.register_to_config(force_upcast=False)
    pipe.scheduler = scheduler_for(config.scheduler, pipe.scheduler.config, config.karras)
    pipe.set_progress_bar_config(disable=not progress, desc=f"reference {config.dtype}", leave=False)
    x_t = config.initial_noise(latent_channels=pipe.vae.config.latent_channels, scale=pipe.vae_scale_factor)
    x_t_tensor = torch.from_numpy(x_t).to(config.device, TORCH_DTYPES[config.dtype])
    spec = CaptureSpec.parse(config.capture_spec(unet_parameter_count(model_dir)))
    # the hash names the x_T this run started from: the fixture noise rounded to the run's dtype
    metadata = run_metadata(config, impl="reference", model_dir=model_dir, x_t=x_t_tensor.float().cpu().numpy(),
                            scheduler_config=dict(pipe.scheduler.config))
    if oracle:
        metadata["oracle"] = "fp64 run of the reference (time embedding in float64 too)"
    guided = config.guidance > 1.0
    with RunWriter(output, metadata, compression=config.compression, background_bytes=WRITE_QUEUE_BYTES) as writer:
        recorder = Recorder(writer, spec, total_steps=config.steps)
        recorder.pipeline("x_T", x_t_tensor)
        sink = RecorderSink(recorder)
        with ExitStack() as stack:
            for component in family.components:
                # a component sharing its module with another (the VAE halves) is its subtrees; its calls
                # are the pipeline's encode/decode calls (_pipeline_taps), not the module's
                stack.enter_context(hook_module(getattr(pipe, component.folder), component.name, sink,
                                                include=component.subtrees,
                                                invocations=not component.subtrees))
            stack.enter_context(_pipeline_taps(recorder, pipe, family, guided))
            stack.enter_context(_noise_sources(recorder, pipe, x_t_tensor))
            stack.enter_context(networks.attached())
            stack.enter_context(exact_time_embedding() if oracle else nullcontext())
            stack.enter_context(warnings.catch_warnings())
            # SDXL's pipeline calls its own deprecated upcast_vae() (force_upcast at fp16): not the user's concern
            warnings.filterwarnings("ignore", message=".*upcast_vae.*deprecated", category=FutureWarning)
            with torch.inference_mode():
                result = pipe(**_call_arguments(config, x_t_tensor),
                              generator=torch.Generator(device="cpu").manual_seed(config.seed),
                              callback_on_step_end=_step_end_callback(recorder, config.pipeline))
        image = np.asarray(result.images, dtype=np.float32)
        recorder.pipeline("image", image)
        recorder.pipeline("image_uint8", (image * 255).round().astype(np.uint8))
    return output
