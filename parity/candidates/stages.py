"""Pipeline stages in isolated mode: the candidate's own glue code, fed the reference's tensors.

The pipeline around the networks is split into the stages below; the driver reads each stage's inputs
from the reference run file, calls `candidate.run_stage(stage, inputs)` and records the outputs under
the reference's tensor names, so a bug in the glue (the negative prompt's embedding used for both
guidance halves, guidance halves swapped, a wrong model-input scaling, a sampler step off by one, the
VAE scaling applied twice) is named at its stage instead of showing up as accumulated error.

    stage            inputs (from the reference)                        outputs (recorded as)
    prompt_encoding  token_ids, [negative_token_ids], and each further  encoder_hidden_states (the UNet's
                     text encoder's (token_ids_2, negative_...)         conditioning: unet/step_*/@encoder_hidden_states),
                                                                        [add_text_embeds, add_time_ids] (SDXL's
                                                                        added conditions, also as the UNet's
                                                                        @added_cond_kwargs[text_embeds|time_ids])
    init_latents     mean, logvar, posterior_noise, x_T (img2img)       add_noise_original, add_noise_output
    model_input      step, latents, from_x_T, guided,                   latent_model_input, timestep
                     [mask, masked_image_latents]
    guidance         step, noise_pred_uncond, noise_pred_text,          noise_pred
                     guidance_scale
    sampler_step     step, noise_pred, latents, from_x_T, [noise]       step_output
    decode_input     latents (after the last step)                      z (vae_decoder/call_0/@z)

`prompt_encoding` covers tokens to conditioning: the candidate's text encoder and its classifier-free
guidance batching ([negative; prompt], repeated per image). `step` is the denoising step (0 = the first
step the run takes, also for img2img). `latents` are the latents entering the step; with `from_x_T`
true (step 0 of txt2img) they are x_T itself, which the candidate scales by its sampler's initial
sigma. The stages of one run are called in this order, the per-step ones in step order from step 0
(multistep samplers keep history). A candidate raises NotImplementedError for a stage it cannot run
alone; the stage's tensors are then missing from the isolated run.
"""
from __future__ import annotations

import re
from typing import Any

from sd_parity.runs.config import RunConfig
from sd_parity.runs.hdf5 import RunReader
from sd_parity.runs.recorder import Recorder

STAGES = ("prompt_encoding", "init_latents", "model_input", "guidance", "sampler_step", "decode_input")


class _StageDriver:
    def __init__(self, candidate: Any, ref: RunReader, recorder: Recorder):
        self.candidate, self.ref, self.recorder = candidate, ref, recorder
        self.keys = {e.key for e in ref.entries()}

    def read(self, key: str):
        return self.ref.read(key) if key in self.keys else None

    def run(self, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.candidate.run_stage(name, inputs) or {}
        except NotImplementedError:
            return {}

    def record(self, outputs: dict[str, Any], step: int | None = None) -> None:
        for name, value in outputs.items():
            self.recorder.pipeline(name, value, step=step)


def isolate_pipeline_stages(candidate: Any, ref: RunReader, recorder: Recorder, config: RunConfig) -> None:
    driver = _StageDriver(candidate, ref, recorder)
    _prompt_encoding(driver)
    latents = _init_latents(driver, config)
    if latents is None:
        return  # a full-strength inpainting start has no captured input to isolate from
    steps = [inv for inv in ref.invocations("pipeline") if inv.startswith("step_")]
    for loop, invocation in enumerate(steps):
        key = f"pipeline/{invocation}/"
        if key + "noise_pred" not in driver.keys:
            return
        from_x_T = config.pipeline == "txt2img" and loop == 0
        guided = key + "noise_pred_uncond" in driver.keys
        extra = {k: driver.read(f"pipeline/main/{k}") for k in ("mask", "masked_image_latents")
                 if f"pipeline/main/{k}" in driver.keys}
        driver.record(driver.run("model_input", {"step": loop, "latents": latents, "guided": guided,
                                                 "from_x_T": from_x_T, **extra}), step=loop)
        if guided:
            driver.record(driver.run("guidance", {"step": loop, "noise_pred_uncond": driver.read(key + "noise_pred_uncond"),
                                                  "noise_pred_text": driver.read(key + "noise_pred_text"),
                                                  "guidance_scale": config.guidance}), step=loop)
        driver.record(driver.run("sampler_step", {"step": loop, "noise_pred": driver.read(key + "noise_pred"),
                                                  "latents": latents, "from_x_T": from_x_T,
                                                  "noise": driver.read(key + "noise")}), step=loop)
        latents = driver.read(key + "latents")
    if "vae_decoder" in ref.components():
        outputs = driver.run("decode_input", {"latents": latents})
        if outputs:
            with recorder.invocation("vae_decoder", "call_0"):
                recorder.module_inputs("vae_decoder", "", outputs)


def _prompt_encoding(driver: _StageDriver) -> None:
    """Token ids to the UNet's conditioning, recorded as the input of every captured UNet step; SDXL's
    added conditions (pooled text embeds, add_time_ids) also under their pipeline names."""
    ids = {key.rsplit("/", 1)[1]: driver.read(key) for key in sorted(driver.keys)
           if re.fullmatch(r"pipeline/main/(negative_)?token_ids(_\d+)?", key)}
    if "token_ids" not in ids:
        return
    outputs = driver.run("prompt_encoding", {"negative_token_ids": None, **ids})
    if not outputs:
        return
    added = {name: outputs.pop(f"add_{name}") for name in ("text_embeds", "time_ids") if f"add_{name}" in outputs}
    driver.record({f"add_{name}": value for name, value in added.items()})
    unet_inputs = {**outputs, **({"added_cond_kwargs": added} if added else {})}
    for invocation in driver.ref.invocations("unet"):
        if f"unet/{invocation}/@encoder_hidden_states" in driver.keys:
            with driver.recorder.invocation("unet", invocation):
                driver.recorder.module_inputs("unet", "", unet_inputs)


def _init_latents(driver: _StageDriver, config: RunConfig):
    """The latents entering step 0: x_T for txt2img; for img2img the init image's latents noised to the
    first step's level, isolated as a stage when the reference captured the encoder's posterior."""
    if config.pipeline == "txt2img":
        return driver.read("pipeline/main/x_T")
    names = ("vae_encoder/call_0/mean", "vae_encoder/call_0/logvar", "pipeline/main/posterior_noise")
    if config.pipeline == "img2img" and all(name in driver.keys for name in names):
        mean, logvar, noise = (driver.read(name) for name in names)
        driver.record(driver.run("init_latents", {"mean": mean, "logvar": logvar, "posterior_noise": noise,
                                                  "x_T": driver.read("pipeline/main/x_T")}))
    return driver.read("pipeline/main/add_noise_output")
