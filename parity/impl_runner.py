"""Runs impl/ (NumPy or torch backend) and writes its run file, free-running or isolated.

Free mode runs the impl pipeline from the same x_T, token ids and recorded noise as the reference.
Isolated mode feeds every block the reference's captured inputs (and every sampler step the
reference's latents and noise prediction), so each tensor's error is the block's own, not inherited.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from impl.pipeline import Observer, Request, StableDiffusion, seeded_noise

from .capture_spec import CaptureSpec
from collections import defaultdict

from .naming import block_of, with_call_index
from .recorder import Recorder
from .runconfig import RunConfig, run_metadata, unet_parameter_count
from .runfile import Entry, RunReader, RunWriter, step_label

WRITE_QUEUE_BYTES = 256 << 20
BACKENDS = ("numpy", "torch")


class _Taps:
    """impl's taps contract, forwarded to the recorder for one component.

    `outside_blocks` keeps only the outputs of modules outside every block (the whole-component pass of
    an isolated run, whose block tensors come from the block-by-block passes) and none of the inputs."""

    def __init__(self, recorder: Recorder, component: str, outside_blocks: bool = False):
        self.recorder, self.component, self.outside_blocks = recorder, component, outside_blocks

    def output(self, path: str, value: Any) -> None:
        if not self.outside_blocks or block_of(self.component, path) is None:
            self.recorder.module_output(self.component, path, value)

    def inputs(self, path: str, args: dict[str, Any]) -> None:
        if not self.outside_blocks:
            self.recorder.module_inputs(self.component, path, args)


class ProgressObserver(Observer):
    """A progress bar over denoising steps (on a terminal)."""

    def __init__(self, progress: bool, total: int, label: str):
        self._bar = _progress_bar(progress, total, label)

    def progress(self, step: int, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(1)
            if step == total:
                self._bar.close()


class _RecordingObserver(ProgressObserver):
    def __init__(self, recorder: Recorder, progress: bool, total: int, label: str):
        super().__init__(progress, total, label)
        self.recorder = recorder

    @contextmanager
    def component(self, name: str) -> Iterator[Any]:
        with self.recorder.invocation(name):
            yield _Taps(self.recorder, name) if self.recorder.active(name) else None

    def tensor(self, name: str, value: Any, step: int | None = None) -> None:
        self.recorder.pipeline(name, value, step=step)


def _progress_bar(enabled: bool, total: int, label: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="step", leave=False, file=sys.stderr)


def recorded_noise(reference: Path):
    """Replay the reference's recorded draws: `pipeline/step_NNN/noise`, `pipeline/main/posterior_noise#k`."""
    reader = RunReader(reference)

    def draw(kind: str, index: int, shape: tuple) -> np.ndarray:
        key = (f"pipeline/{step_label(index)}/noise" if kind == "step"
               else f"pipeline/main/{with_call_index('posterior_noise', index)}")
        if key not in reader:
            raise ValueError(f"{reference} recorded no {key}; capture the reference with the same sampler and pipeline")
        noise = reader.read(key).astype(np.float32)
        if noise.shape != tuple(shape):
            raise ValueError(f"recorded {key} has shape {noise.shape}, the impl asks for {tuple(shape)}")
        return noise

    return draw


def load_impl(config: RunConfig, backend: str) -> StableDiffusion:
    return StableDiffusion.from_folder(config.model_dir(), backend=backend, dtype=config.dtype,
                                       **({"device": config.device} if backend == "torch" else {}))


def injected_fault(sd: StableDiffusion, config: RunConfig):
    """The fault named by the run's config (`--inject-fault`), applied for the duration of the run."""
    name = config.extra.get("fault")
    if name is None:
        return nullcontext()
    from .faults import fault

    return fault(name).apply(sd)


def request_for(config: RunConfig, sd: StableDiffusion, x_t: np.ndarray, noise) -> Request:
    image, mask = config.load_images()
    return Request(prompt=config.prompts(), negative_prompt=config.negative_prompts(), steps=config.steps,
                   sampler=config.scheduler, guidance=config.guidance, eta=config.eta, karras=config.karras,
                   x_T=x_t, images_per_prompt=config.images_per_prompt, height=config.height, width=config.width,
                   init_image=image, mask=mask, strength=config.strength if image is not None else 1.0, noise=noise)


def run_impl(config: RunConfig, output: Path, backend: str, progress: bool = False,
             reference: Path | None = None) -> Path:
    """Free-running impl capture; stochastic draws replay `reference`'s, or come from the seed without one."""
    sd = load_impl(config, backend)
    x_t = config.initial_noise(scale=sd.vae_scale)
    noise = recorded_noise(reference) if reference is not None else seeded_noise(config.seed)
    spec = CaptureSpec.parse(config.capture_spec(unet_parameter_count(config.model_dir())))
    metadata = run_metadata(config, impl=backend, model_dir=config.model_dir(), x_t=x_t,
                            scheduler_config=sd.scheduler_config)
    with RunWriter(output, metadata, compression=config.compression, background_bytes=WRITE_QUEUE_BYTES) as writer:
        recorder = Recorder(writer, spec, total_steps=config.steps)
        observer = _RecordingObserver(recorder, progress, config.steps, f"impl {backend} {config.dtype}")
        with injected_fault(sd, config):
            pixels = sd(request_for(config, sd, x_t, noise), observer)
        recorder.pipeline("image", pixels)
        recorder.pipeline("image_uint8", (pixels * 255).round().astype(np.uint8))
    return output


def run_impl_isolated(config: RunConfig, reference: Path, output: Path, backend: str) -> Path:
    """Every block, component and sampler step of the reference re-run by impl on the reference's inputs."""
    sd = load_impl(config, backend)
    with RunReader(reference) as ref:
        x_t = ref.read("pipeline/main/x_T")
        metadata = run_metadata(config, impl=backend, model_dir=config.model_dir(), x_t=x_t,
                                scheduler_config=sd.scheduler_config, mode="isolated")
        by_invocation: dict[tuple[str, str], list[Entry]] = defaultdict(list)
        for entry in ref.entries():
            by_invocation[(entry.component, entry.invocation)].append(entry)
        with RunWriter(output, metadata, compression=config.compression,
                       background_bytes=WRITE_QUEUE_BYTES) as writer, injected_fault(sd, config):
            recorder = Recorder(writer, CaptureSpec.parse("all"), total_steps=config.steps)
            for component in ("text_encoder", "vae_encoder", "unet", "vae_decoder"):
                model = sd.models.component(component) if _has(sd, component) else None
                for invocation in ref.invocations(component) if model is not None else []:
                    _isolate_invocation(ref, by_invocation[(component, invocation)], recorder, model,
                                        component, invocation)
            _isolate_sampler_steps(ref, recorder, sd, config)
    return output


def _has(sd: StableDiffusion, component: str) -> bool:
    vae = sd.models.vae
    return not ((component == "vae_decoder" and vae.decoder is None) or (component == "vae_encoder" and vae.encoder is None))


def _inputs_of(ref: RunReader, entries: list[Entry], block: str) -> dict[str, np.ndarray]:
    """The captured `block@argument` tensors among `entries`, keyed by `argument` (flattened names kept)."""
    prefix = f"{block}@"
    return {e.name[len(prefix):]: ref.read(e, restore_layout=True) for e in entries
            if e.name.startswith(prefix) and "#" not in e.name[len(prefix):]}


def _isolate_invocation(ref: RunReader, entries: list[Entry], recorder: Recorder, model, component: str,
                        invocation: str) -> None:
    """The component on its captured inputs (keeping what lies outside blocks), then each block alone."""
    with recorder.invocation(component, invocation):
        root_inputs = _inputs_of(ref, entries, "")
        if root_inputs:
            model.run_block("", root_inputs, _Taps(recorder, component, outside_blocks=True))
        for block in model.block_names():
            inputs = _inputs_of(ref, entries, block)
            if inputs:
                model.run_block(block, inputs, _Taps(recorder, component))


def _isolate_sampler_steps(ref: RunReader, recorder: Recorder, sd: StableDiffusion, config: RunConfig) -> None:
    """Each sampler step fed the reference's latents, guidance halves and noise, in order (multistep
    samplers keep their history of reference-fed steps)."""
    steps = [inv for inv in ref.invocations("pipeline") if inv.startswith("step_")]
    if not steps:
        return
    ops = sd.ops
    sampler = sd.sampler(config.scheduler, config.steps, eta=config.eta, karras=config.karras)
    start = 0 if config.pipeline == "txt2img" else sampler.img2img_start(config.strength)
    names = {e.key for e in ref.entries() if e.component == "pipeline"}
    if config.pipeline == "txt2img":
        latents = ops.asarray(ref.read("pipeline/main/x_T")) * sampler.init_noise_sigma
    elif "pipeline/main/add_noise_output" in names:
        latents = ops.asarray(ref.read("pipeline/main/add_noise_output"))
    else:
        return  # a full-strength inpainting start has no captured input to isolate from
    for loop, invocation in enumerate(steps):
        key = f"pipeline/{invocation}/"
        if key + "noise_pred" not in names:
            return
        index = start + loop
        model_input = ops.cat([latents, latents], 0) if key + "noise_pred_uncond" in names else latents
        model_input = sampler.scale_model_input(model_input, index)
        recorder.pipeline("timestep", np.asarray([sampler.timesteps[index]]), step=loop)
        if sd.models.unet.in_channels == 9:
            model_input = ops.cat([model_input, ops.asarray(ref.read("pipeline/main/mask")),
                                   ops.asarray(ref.read("pipeline/main/masked_image_latents"))], 1)
        recorder.pipeline("latent_model_input", model_input, step=loop)
        if key + "noise_pred_uncond" in names:
            uncond, text = (ops.asarray(ref.read(key + part)) for part in ("noise_pred_uncond", "noise_pred_text"))
            recorder.pipeline("noise_pred", sd.guide(uncond, text, config.guidance), step=loop)
        noise = ops.asarray(ref.read(key + "noise")) if key + "noise" in names else None
        output = sampler.step(ops.asarray(ref.read(key + "noise_pred")), index, latents, noise=noise)
        recorder.pipeline("step_output", output, step=loop)
        latents = ops.asarray(ref.read(key + "latents"))
    if "vae_decoder" in ref.components():
        # the decoder's input is the last latents over the VAE's scaling factor: a pipeline stage too
        with recorder.invocation("vae_decoder", "call_0"):
            recorder.module_inputs("vae_decoder", "", {"z": latents / sd.models.vae.scaling_factor})


__all__ = ["BACKENDS", "ProgressObserver", "load_impl", "recorded_noise", "run_impl", "run_impl_isolated"]
