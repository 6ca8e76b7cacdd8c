"""impl/'s NumPy and torch backends as candidates: the first users of the candidate protocol."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from sd_parity.errors import require_extra
from sd_parity.impl.pipeline import Observer, Request, StableDiffusion
from sd_parity.devices import prepare as prepare_device
from sd_parity.runs.cache import source_fingerprint
from sd_parity.runs.config import RunConfig

from .protocol import Candidate, RunContext
from .runner import ComponentTaps

BACKENDS = ("numpy", "torch")


class ImplCandidate(Candidate):
    """impl/ on one backend, optionally with a known porting bug injected (sd_parity.candidates.faults)."""

    def __init__(self, backend: str, fault: str | None = None):
        if backend == "torch":
            require_extra("impl's torch backend", ("torch",))
        self.backend, self.fault = backend, fault
        self.name = backend
        self.facts = {"fault": fault} if fault else {}
        self.sd: StableDiffusion | None = None
        self.config: RunConfig | None = None
        self._sampler = None

    def prepare(self, config: RunConfig, model_dir) -> None:
        self.config = config
        if self.backend == "torch":
            prepare_device(config.device)
        self.facts = {**self.facts, "device": config.device if self.backend == "torch" else "cpu"}
        self.sd = StableDiffusion.from_folder(model_dir, backend=self.backend, dtype=config.dtype,
                                              **({"device": config.device} if self.backend == "torch" else {}))
        self._applied_fault = None
        if self.fault is not None:
            from .faults import fault

            # the model is this run's alone, so the fault is never undone; holding the context keeps
            # it from being closed (and undone) when garbage-collected
            self._applied_fault = fault(self.fault).apply(self.sd)
            self._applied_fault.__enter__()

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.backend}|{self.fault}|{source_fingerprint('sd_parity.impl', 'sd_parity.candidates')}"
                              .encode()).hexdigest()

    # --- free mode --------------------------------------------------------------------------------
    def capture(self, run: RunContext) -> None:
        sd = self.sd
        observer = _RecordingObserver(run)
        pixels = sd(request_for(run.config, run.replay.x_T, run.replay.noise), observer)
        run.recorder.pipeline("image", pixels)
        run.recorder.pipeline("image_uint8", (pixels * 255).round().astype(np.uint8))

    # --- isolated mode ----------------------------------------------------------------------------
    def run_block(self, component: str, block: str, inputs: dict[str, np.ndarray], taps) -> None:
        model = self._component(component)
        if model is None:
            raise NotImplementedError(f"this model has no {component}")
        model.run_block(block, inputs, taps)

    def run_stage(self, stage: str, inputs: dict[str, Any]) -> dict[str, Any]:
        sd, config = self.sd, self.config
        ops = sd.ops
        step = inputs.get("step", 0)
        if stage != "decode_input" and (step == 0 or self._sampler is None):
            self._sampler = sd.sampler(config.scheduler, config.steps, eta=config.eta, karras=config.karras)
        sampler = self._sampler
        start = 0 if config.pipeline == "txt2img" else sampler.img2img_start(config.strength)
        index = start + step
        if stage in ("model_input", "sampler_step"):
            latents = ops.asarray(inputs["latents"])
            if inputs.get("from_x_T"):
                latents = sampler.initial_latents(latents)
        if stage == "model_input":
            model_input = ops.cat([latents, latents], 0) if inputs["guided"] else latents
            model_input = sampler.scale_model_input(model_input, index)
            if sd.models.unet.in_channels == 9:
                model_input = ops.cat([model_input, ops.asarray(inputs["mask"]),
                                       ops.asarray(inputs["masked_image_latents"])], 1)
            return {"timestep": np.asarray([sampler.timesteps[index]]), "latent_model_input": model_input}
        if stage == "guidance":
            uncond, text = (ops.asarray(inputs[k]) for k in ("noise_pred_uncond", "noise_pred_text"))
            return {"noise_pred": sd.guide(uncond, text, inputs["guidance_scale"])}
        if stage == "sampler_step":
            noise = ops.asarray(inputs["noise"]) if inputs.get("noise") is not None else None
            return {"step_output": sampler.step(ops.asarray(inputs["noise_pred"]), index, latents, noise=noise)}
        if stage == "decode_input":
            return {"z": ops.asarray(inputs["latents"]) / sd.models.vae.scaling_factor}
        raise NotImplementedError(stage)

    def _component(self, component: str):
        vae = self.sd.models.vae
        if (component == "vae_decoder" and vae.decoder is None) or (component == "vae_encoder" and vae.encoder is None):
            return None
        return self.sd.models.component(component)


class ProgressObserver(Observer):
    """impl's pipeline observer that only reports progress (`progress(step, total)`)."""

    def __init__(self, progress):
        self.progress = progress


class _RecordingObserver(Observer):
    """impl's pipeline observer, reporting into the run's recorder."""

    def __init__(self, run: RunContext):
        self.run = run

    @contextmanager
    def component(self, name: str) -> Iterator[ComponentTaps | None]:
        recorder = self.run.recorder
        with recorder.invocation(name):
            yield ComponentTaps(recorder, name) if recorder.active(name) else None

    def tensor(self, name: str, value: Any, step: int | None = None) -> None:
        self.run.recorder.pipeline(name, value, step=step)

    def progress(self, step: int, total: int) -> None:
        self.run.progress(step, total)


def request_for(config: RunConfig, x_t: np.ndarray, noise) -> Request:
    image, mask = config.load_images()
    return Request(prompt=config.prompts(), negative_prompt=config.negative_prompts(), steps=config.steps,
                   sampler=config.scheduler, guidance=config.guidance, eta=config.eta, karras=config.karras,
                   x_T=x_t, images_per_prompt=config.images_per_prompt, height=config.height, width=config.width,
                   init_image=image, mask=mask, strength=config.strength if image is not None else 1.0, noise=noise)
