"""A non-torch Python port, as sd-parity sees one (a JAX, MLX or tinygrad port looks the same): NumPy
arrays in and out, reported with sd_parity.wrap (each network call is one invocation), sd_parity.tap
(pipeline tensors) and sd_parity.tap_inputs, starting from the reference's x_T and token ids and
consuming its recorded sampler noise, so stochastic samplers line up without torch's RNG.

Its networks stand in for the port's own: impl/'s NumPy networks, whose per-module callbacks the port
forwards to sd_parity.tap. Its loop is its own (txt2img; any of impl's samplers).

    parity run --model tiny-sd1 --candidate tests/ports/numpy_port.py:make --mode free --output-dir reports/np
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

import sd_parity
from sd_parity.impl.pipeline import StableDiffusion


class ForwardTaps:
    """The networks' per-module callbacks, forwarded to sd_parity; the component's own inputs and
    output are reported by sd_parity.wrap."""

    def __init__(self, component: str):
        self.component = component

    def output(self, path, value):
        if path:
            sd_parity.tap(self.component, path, value)

    def inputs(self, path, args):
        if path:
            sd_parity.tap_inputs(self.component, path, args)


class NumpyPort:
    """A candidate by duck typing: prepare, capture, fingerprint (no isolated mode)."""

    name = "numpy-port"
    tensors = "blocks"

    def prepare(self, config, model_dir: Path) -> None:
        if config.pipeline != "txt2img":
            raise sd_parity.BadInput(f"{self.name} implements txt2img only")
        sd = StableDiffusion.from_folder(model_dir, backend="numpy", dtype=config.dtype)
        models = sd.models
        self.sampler = sd.sampler(config.scheduler, config.steps, eta=config.eta, karras=config.karras)
        self.scaling_factor = models.vae.scaling_factor

        def text_encoder(input_ids):
            return models.text_encoder(input_ids, taps=ForwardTaps("text_encoder"))

        def unet(sample, timestep, encoder_hidden_states):
            return models.unet(sample, timestep, encoder_hidden_states, taps=ForwardTaps("unet"))

        def vae_decoder(z):
            return models.vae.decode(z, taps=ForwardTaps("vae_decoder"))

        self.text_encoder = sd_parity.wrap(text_encoder, "text_encoder")
        self.unet = sd_parity.wrap(unet, "unet")
        self.vae_decoder = sd_parity.wrap(vae_decoder, "vae_decoder")

    def fingerprint(self) -> str:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    def capture(self, run) -> None:
        self.generate(run.replay, run.config.guidance)

    def generate(self, replay, guidance: float) -> np.ndarray:
        """The port's pipeline on the reference's inputs; every tensor goes to the run being captured."""
        tap, sampler = sd_parity.tap, self.sampler
        guided = guidance > 1.0
        ids = replay.token_ids()
        tap("pipeline", "x_T", replay.x_T)
        tap("pipeline", "token_ids", ids)
        context = self.text_encoder(ids)["last_hidden_state"]
        if guided:
            negative_ids = replay.token_ids(negative=True)
            tap("pipeline", "negative_token_ids", negative_ids)
            context = np.concatenate([self.text_encoder(negative_ids)["last_hidden_state"], context])
        latents = replay.x_T * sampler.init_noise_sigma
        for step, t in enumerate(sampler.timesteps):
            model_input = sampler.scale_model_input(np.concatenate([latents, latents]) if guided else latents, step)
            timestep = np.asarray([t])
            tap("pipeline", "latent_model_input", model_input, step=step)
            tap("pipeline", "timestep", timestep, step=step)
            eps = self.unet(model_input, timestep, context)
            if guided:
                uncond, text = np.split(eps, 2)
                tap("pipeline", "noise_pred_uncond", uncond, step=step)
                tap("pipeline", "noise_pred_text", text, step=step)
                eps = uncond + guidance * (text - uncond)
            tap("pipeline", "noise_pred", eps, step=step)
            noise = replay.noise("step", step, latents.shape) if sampler.needs_noise(step) else None
            if noise is not None:
                tap("pipeline", "noise", noise, step=step)
            latents = sampler.step(eps, step, latents, noise=noise)
            tap("pipeline", "step_output", latents, step=step)
            tap("pipeline", "latents", latents, step=step)
        image = np.clip(self.vae_decoder(latents / self.scaling_factor) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        tap("pipeline", "image", image.astype(np.float32))
        tap("pipeline", "image_uint8", (image * 255).round().astype(np.uint8))
        return image


def make() -> NumpyPort:
    return NumpyPort()
