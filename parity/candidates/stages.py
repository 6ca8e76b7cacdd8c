"""Pipeline stages in isolated mode: the candidate's own glue code, fed the reference's tensors.

Each denoising step is split into the stages below; the driver reads the stage's inputs from the
reference run file, calls `candidate.run_stage(stage, inputs)` and records the outputs under the
reference's pipeline tensor names, so a bug in the glue (guidance halves swapped, a wrong model-input
scaling, a sampler step off by one) is named at its stage instead of showing up as accumulated error.

    stage           inputs (from the reference)                         outputs (recorded)
    model_input     step, latents, [mask, masked_image_latents]         latent_model_input, timestep
    guidance        step, noise_pred_uncond, noise_pred_text, scale     noise_pred
    sampler_step    step, noise_pred, latents, [noise]                  step_output
    decode_input    latents (after the last step)                       z (the VAE decoder's input)

`step` is the denoising step (0 = the first step the run takes, also for img2img). `latents` are the
latents entering the step; with `from_x_T` true (step 0 of txt2img) they are x_T itself, which the
candidate scales by its sampler's initial sigma. Multistep samplers keep history: the stages of one
run are called in step order, starting at step 0.
"""
from __future__ import annotations

from typing import Any

from sd_parity.runs.config import RunConfig
from sd_parity.runs.hdf5 import RunReader
from sd_parity.runs.recorder import Recorder

STAGES = ("model_input", "guidance", "sampler_step", "decode_input")


def isolate_pipeline_stages(candidate: Any, ref: RunReader, recorder: Recorder, config: RunConfig) -> None:
    steps = [inv for inv in ref.invocations("pipeline") if inv.startswith("step_")]
    names = {e.key for e in ref.entries() if e.component == "pipeline"}

    def read(key: str):
        return ref.read(key) if key in names else None

    def stage(name: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return candidate.run_stage(name, inputs)
        except NotImplementedError:
            return None

    latents = read("pipeline/main/x_T") if config.pipeline == "txt2img" else read("pipeline/main/add_noise_output")
    if latents is None:
        return  # a full-strength inpainting start has no captured input to isolate from
    first_latents = True
    for loop, invocation in enumerate(steps):
        key = f"pipeline/{invocation}/"
        if key + "noise_pred" not in names:
            return
        guided = key + "noise_pred_uncond" in names
        extra = {k: read(f"pipeline/main/{k}") for k in ("mask", "masked_image_latents")
                 if f"pipeline/main/{k}" in names}
        outputs = stage("model_input", {"step": loop, "latents": latents, "guided": guided,
                                        "from_x_T": config.pipeline == "txt2img" and first_latents, **extra})
        for name, value in (outputs or {}).items():
            recorder.pipeline(name, value, step=loop)
        if guided:
            outputs = stage("guidance", {"step": loop, "noise_pred_uncond": read(key + "noise_pred_uncond"),
                                         "noise_pred_text": read(key + "noise_pred_text"),
                                         "guidance_scale": config.guidance})
            for name, value in (outputs or {}).items():
                recorder.pipeline(name, value, step=loop)
        outputs = stage("sampler_step", {"step": loop, "noise_pred": read(key + "noise_pred"), "latents": latents,
                                         "from_x_T": config.pipeline == "txt2img" and first_latents,
                                         "noise": read(key + "noise")})
        for name, value in (outputs or {}).items():
            recorder.pipeline(name, value, step=loop)
        latents, first_latents = read(key + "latents"), False
    if "vae_decoder" in ref.components():
        outputs = stage("decode_input", {"latents": latents})
        if outputs:
            with recorder.invocation("vae_decoder", "call_0"):
                recorder.module_inputs("vae_decoder", "", outputs)
