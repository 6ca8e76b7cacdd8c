"""impl/'s NumPy and torch backends as candidates: the first users of the candidate protocol."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from sd_parity.errors import BadInput, require_extra
from sd_parity.devices import prepare as prepare_device
from sd_parity.impl.pipeline import Observer, PipelineRun, Request, StableDiffusion
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
        self._run: PipelineRun | None = None

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

            injected = fault(self.fault)
            if injected.families is not None and self.sd.family.name not in injected.families:
                raise BadInput(f"fault {self.fault!r} is a bug of {', '.join(injected.families)} models; "
                               f"this model is {self.sd.family.title}")
            # the model is this run's alone, so the fault is never undone; holding the context keeps
            # it from being closed (and undone) when garbage-collected
            self._applied_fault = injected.apply(self.sd)
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
        """Each stage is impl's own pipeline code (a PipelineRun's stage method) on the given tensors."""
        run = self._stage_run(stage, inputs)
        ops = self.sd.ops
        if stage == "prompt_encoding":
            ids = {name: value for name, value in inputs.items() if name.startswith("token_ids")}
            negative = {name[len("negative_"):]: value for name, value in inputs.items()
                        if name.startswith("negative_token_ids") and value is not None}
            context, added = run.prompt_context(ids, negative or None)
            return {"encoder_hidden_states": context, **{f"add_{k}": v for k, v in (added or {}).items()}}
        if stage == "init_latents":
            latents = run.encoded_latents(inputs["mean"], inputs["logvar"], ops.asarray(inputs["posterior_noise"]))
            return {"add_noise_original": latents,
                    "add_noise_output": run.noised(latents, ops.asarray(inputs["x_T"]), run.start_index)}
        if stage == "decode_input":
            return {"z": run.decode_input(ops.asarray(inputs["latents"]))}
        if stage == "guidance":
            return {"noise_pred": run.guided_prediction(ops.asarray(inputs["noise_pred_uncond"]),
                                                        ops.asarray(inputs["noise_pred_text"]))}
        if stage not in ("model_input", "sampler_step"):
            raise NotImplementedError(stage)
        index = run.start_index + inputs["step"]
        latents = ops.asarray(inputs["latents"])
        if inputs.get("from_x_T"):
            latents = run.initial_latents(latents)
        if stage == "model_input":
            model_input, timestep = run.model_input(index, latents, inputs)
            return {"latent_model_input": model_input, "timestep": timestep}
        noise = ops.asarray(inputs["noise"]) if inputs.get("noise") is not None else None
        return {"step_output": run.sampler_step(index, ops.asarray(inputs["noise_pred"]), latents, noise)}

    def _stage_run(self, stage: str, inputs: dict[str, Any]) -> PipelineRun:
        """The pipeline run whose stages an isolated run calls: a new one (fresh sampler history) when
        the stages start over, at prompt encoding or at step 0."""
        if self._run is None or stage == "prompt_encoding" or (stage == "model_input" and inputs["step"] == 0):
            config = self.config
            self._run = self.sd.start(request_for(config, None, noise=None))
        return self._run

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


def request_for(config: RunConfig, x_t: np.ndarray | None, noise) -> Request:
    image, mask = config.load_images()
    return Request(prompt=config.prompts(), negative_prompt=config.negative_prompts(), steps=config.steps,
                   sampler=config.scheduler, guidance=config.guidance, eta=config.eta, karras=config.karras,
                   x_T=x_t, images_per_prompt=config.images_per_prompt, height=config.height, width=config.width,
                   init_image=image, mask=mask, strength=config.strength if image is not None else 1.0, noise=noise)
