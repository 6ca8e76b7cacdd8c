"""Stable Diffusion pipelines (txt2img, img2img, inpainting) over impl's networks and samplers.

    sd = StableDiffusion.from_folder("fixtures/models/tiny-sd1", backend="torch", dtype="fp32")
    pixels = sd(Request(prompt="a red cube", steps=20, sampler="ddim", x_T=noise))  # (B, H, W, 3) in [0, 1]

Every random draw comes from the request's `noise` source: the initial noise is `x_T` (a file, not an
RNG), and the sampler's and VAE posterior's draws are asked for by (kind, index), so a parity run can
replay the reference's recorded draws and a standalone run can draw them from a seed.
An `Observer` sees each component invocation (and gives it taps) and each pipeline-level tensor,
named as in the run-file format (docs/run-format.md).

`StableDiffusion.start(request)` returns the `PipelineRun` that `__call__` executes; its stage methods
(`prompt_context`, `encoded_latents`, `noised`, `model_input`, `guided_prediction`, `sampler_step`,
`decode_input`) can also be called one at a time on given tensors, which is how a parity harness runs
this pipeline's glue in isolation.
"""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import numpy as np

from .errors import ModelInputError
from .images import image_to_array, mask_to_array, to_pixels
from .models import StableDiffusionModels, load_models
from .ops import get_ops
from .samplers import make_sampler
from .tokenizer import Tokenizer

NoiseSource = Callable[[str, int, tuple], np.ndarray]


def seeded_noise(seed: int) -> NoiseSource:
    """Standalone runs: each draw from NumPy's PCG64, seeded by (seed, kind, index)."""
    kinds = {"step": 1, "posterior": 2}

    def draw(kind: str, index: int, shape: tuple) -> np.ndarray:
        return np.random.default_rng([seed, kinds[kind], index]).standard_normal(shape).astype(np.float32)

    return draw


class Observer:
    """Sees a pipeline run; this base class ignores everything."""

    def component(self, name: str) -> ContextManager[Any]:
        """Entered around each invocation of a network; yields the taps for it (or None)."""
        return nullcontext(None)

    def tensor(self, name: str, value: Any, step: int | None = None) -> None:
        """A pipeline-level tensor, under `main` or denoising step `step`."""

    def progress(self, step: int, total: int) -> None:
        """Called after each denoising step."""


@dataclass
class Request:
    prompt: str | list[str] = ""
    negative_prompt: str | list[str] | None = None
    steps: int = 20
    sampler: str = "ddim"
    guidance: float = 7.5
    eta: float = 0.0
    karras: bool = False
    x_T: np.ndarray | None = None  # (prompts * images_per_prompt, C, H/8, W/8)
    images_per_prompt: int = 1
    height: int = 512
    width: int = 512
    init_image: Any = None  # PIL RGB image: img2img and inpainting
    mask: Any = None  # PIL mask image: inpainting (white = repaint)
    strength: float = 1.0
    noise: NoiseSource = field(default_factory=lambda: seeded_noise(0))

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negative_prompts(self) -> list[str]:
        negative = self.negative_prompt
        if negative is None:
            return [""] * len(self.prompts)
        negative = [negative] if isinstance(negative, str) else list(negative)
        if len(negative) != len(self.prompts):
            raise ModelInputError(f"{len(negative)} negative prompts for {len(self.prompts)} prompts; "
                                  "give one per prompt or a single string")
        return negative


class StableDiffusion:
    def __init__(self, models: StableDiffusionModels, tokenizer: Tokenizer, scheduler_config: dict):
        self.models = models
        self.ops = models.ops
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config

    @classmethod
    def from_folder(cls, folder: str | Path, backend: str = "numpy", dtype: str = "fp32", **ops_options):
        folder = Path(folder)
        config_path = folder / "scheduler" / "scheduler_config.json"
        if not config_path.is_file():
            raise ModelInputError(f"{folder} has no scheduler/scheduler_config.json; pass a diffusers SD folder")
        models = load_models(folder, get_ops(backend, dtype, **ops_options))
        return cls(models, Tokenizer.from_folder(folder / "tokenizer"), json.loads(config_path.read_text()))

    def sampler(self, name: str, steps: int, eta: float = 0.0, karras: bool = False):
        """The sampler for a run, configured from the model's scheduler config."""
        return make_sampler(name, self.scheduler_config, steps, eta=eta, karras=karras)

    @staticmethod
    def guide(uncond, text, scale: float):
        """Classifier-free guidance, in the reference's order of operations."""
        return uncond + scale * (text - uncond)

    def cfg_batch(self, negative, positive):
        """The UNet's conditioning for a guided step: [negative; prompt], one batch for both halves."""
        return self.ops.cat([negative, positive], 0)

    def decode_input(self, latents):
        """The VAE decoder's input: the final latents divided by the VAE's scaling factor."""
        return latents / self.models.vae.scaling_factor

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.models.vae.config.block_out_channels) - 1)

    def __call__(self, request: Request, observer: Observer | None = None) -> np.ndarray:
        """Run the pipeline the request asks for; returns float32 (B, H, W, 3) pixels in [0, 1]."""
        return self.start(request, observer).execute()

    def start(self, request: Request, observer: Observer | None = None) -> "PipelineRun":
        """The run `request` asks for, not yet executed: `execute()` runs it whole, or its stages run
        one at a time (each stage's inputs given, e.g. captured from another implementation)."""
        return PipelineRun(self, request, observer or Observer())


class PipelineRun:
    """One pipeline run: the state diffusers keeps in its __call__, one method per stage. A stage
    keeps its outputs in the storage dtype (as the reference keeps its tensors in the run's dtype),
    also where NumPy would widen a half-precision array times a Python float to float32."""

    def __init__(self, sd: StableDiffusion, request: Request, observer: Observer):
        self.sd, self.request, self.observer = sd, request, observer
        self.ops = sd.ops
        self.unet, self.vae = sd.models.unet, sd.models.vae
        self.guided = request.guidance > 1.0
        self.batch = len(request.prompts) * request.images_per_prompt
        self.in_channels = self.unet.in_channels
        self.kind = "txt2img" if request.init_image is None else "inpaint" if request.mask is not None else "img2img"
        if self.kind == "txt2img" and self.in_channels != 4:
            raise ModelInputError(f"this UNet takes {self.in_channels} input channels (an inpainting model); "
                                  "run it with an init image and a mask")
        self.posterior_draws = 0
        self.sampler = sd.sampler(request.sampler, request.steps, eta=request.eta, karras=request.karras)

    # --- stages ----------------------------------------------------------------------------------
    def execute(self) -> np.ndarray:
        request, ops = self.request, self.ops
        x_t = self._initial_noise()
        self.observer.tensor("x_T", x_t)
        context = self._encode_prompts()
        start = self.start_index
        latents, extra = self._initial_latents(x_t, start)
        total = len(self.sampler.timesteps) - start
        for loop in range(total):
            latents = self._denoise(loop, start + loop, latents, context, extra)
            self.observer.progress(loop + 1, total)
        with self._invocation("vae_decoder") as taps:
            decoded = self.vae.decode(self.decode_input(latents), taps)
        pixels = to_pixels(ops.to_numpy(ops.clamp(ops.scale_shift(decoded, 0.5, 0.5), 0.0, 1.0)))
        return pixels

    def _initial_noise(self):
        request = self.request
        shape = (self.batch, 4, request.height // self.sd.vae_scale, request.width // self.sd.vae_scale)
        if request.height % self.sd.vae_scale or request.width % self.sd.vae_scale:
            raise ModelInputError(f"height and width must be multiples of {self.sd.vae_scale}; "
                                  f"got {request.height}x{request.width}")
        if request.x_T is None:
            raise ModelInputError("the request has no x_T; pass the initial noise (e.g. from fixtures/noise/)")
        if tuple(request.x_T.shape) != shape:
            raise ModelInputError(f"x_T has shape {tuple(request.x_T.shape)}, expected {shape}")
        return self.ops.asarray(request.x_T)

    @property
    def start_index(self) -> int:
        """The sampler index of the first denoising step (img2img and inpainting skip the first ones)."""
        return 0 if self.kind == "txt2img" else self.sampler.img2img_start(self.request.strength)

    def _encode_prompts(self):
        request = self.request
        ids = self.sd.tokenizer(request.prompts)
        self.observer.tensor("token_ids", ids)
        negative_ids = None
        if self.guided:
            negative_ids = self.sd.tokenizer(request.negative_prompts)
            self.observer.tensor("negative_token_ids", negative_ids)
        return self.prompt_context(ids, negative_ids)

    def prompt_context(self, ids, negative_ids=None):
        """Stage: the UNet's conditioning from token ids: the prompt embeddings, [negative; prompt] when
        guided, each repeated per image as diffusers does."""
        with self._invocation("text_encoder") as taps:
            embeddings = self._per_image(self.sd.models.text_encoder.encode(self.ops.asarray(ids), taps=taps))
        if not self.guided:
            return embeddings
        with self._invocation("text_encoder") as taps:
            negative = self._per_image(self.sd.models.text_encoder.encode(self.ops.asarray(negative_ids), taps=taps))
        return self.sd.cfg_batch(negative, embeddings)

    def _per_image(self, embeddings):
        copies = self.request.images_per_prompt
        if copies == 1:
            return embeddings
        ops = self.ops
        batch, tokens, width = embeddings.shape
        return ops.reshape(ops.cat([ops.reshape(embeddings, (batch, 1, tokens, width))] * copies, 1),
                           (batch * copies, tokens, width))

    def _initial_latents(self, x_t, start: int):
        """Latents entering the loop, and what the loop needs besides (mask, image latents, noise)."""
        ops, request = self.ops, self.request
        if self.kind == "txt2img":
            return self.initial_latents(x_t), {}
        height, width = request.height, request.width
        image = ops.asarray(image_to_array(request.init_image, height, width))
        if self.kind == "img2img":
            latents = self._encode_image(image)
            return self.noised(latents, x_t, start), {}
        mask_pixels = mask_to_array(request.mask, height, width)
        full_strength = request.strength == 1.0
        extra: dict[str, Any] = {"noise": x_t}
        if self.in_channels == 4 or not full_strength:
            # the reference repeats these latents per image, which also makes them contiguous; the
            # layout decides which convolution kernels (and roundings) the torch backend gets later
            extra["image_latents"] = ops.contiguous(self._encode_image(image))
        if full_strength:
            latents = self.initial_latents(x_t)
        else:
            latents = self.noised(extra["image_latents"], x_t, start)
        # diffusers' masked image keeps the pixels where the mask is below one half
        masked_image_latents = self._encode_image(ops.mul(image, ops.asarray((mask_pixels < 0.5).astype(np.float32))))
        # nearest-neighbour downsampling by an integer factor picks every `scale`-th pixel
        scale = self.sd.vae_scale
        mask = ops.asarray(np.concatenate([mask_pixels[:, :, ::scale, ::scale]] * self.batch))
        if self.guided:
            mask = ops.cat([mask, mask], 0)
            masked_image_latents = ops.cat([masked_image_latents, masked_image_latents], 0)
        self.observer.tensor("mask", mask)
        self.observer.tensor("masked_image_latents", masked_image_latents)
        extra.update(mask=mask, masked_image_latents=masked_image_latents)
        return latents, extra

    def initial_latents(self, x_t):
        """x_T scaled to the sampler's initial noise level (txt2img, full-strength inpainting)."""
        return self.ops.cast(x_t * self.sampler.init_noise_sigma)

    def _encode_image(self, image):
        """VAE posterior sample times the scaling factor, with the posterior's noise drawn in order."""
        with self._invocation("vae_encoder") as taps:
            mean, logvar = self.vae.encode(image, taps)
        index = self.posterior_draws
        self.posterior_draws += 1
        noise = self.ops.asarray(self.request.noise("posterior", index, tuple(mean.shape)))
        self.observer.tensor("posterior_noise" if index == 0 else f"posterior_noise#{index}", noise)
        return self.encoded_latents(mean, logvar, noise)

    def encoded_latents(self, mean, logvar, noise):
        """Stage: image latents from the VAE encoder's posterior (mean, logvar): a sample with the given
        standard normal `noise`, times the VAE's scaling factor, repeated per image."""
        ops = self.ops
        sample = self.vae.encoder.sample(ops.asarray(mean), ops.asarray(logvar), noise)
        latents = ops.cast(self.vae.scaling_factor * sample)
        copies = self.batch // latents.shape[0]
        return ops.cat([latents] * copies, 0) if copies > 1 else latents

    def noised(self, latents, noise, index: int, step: int | None = None):
        """Stage: `latents` diffused with `noise` to the level sampler index `index` starts from."""
        result = self.ops.cast(self.sampler.add_noise(latents, noise, index))
        self.observer.tensor("add_noise_original", latents, step=step)
        self.observer.tensor("add_noise_output", result, step=step)
        return result

    def _denoise(self, loop: int, index: int, latents, context, extra: dict):
        """One denoising step: diffusers' loop body, tensor for tensor."""
        observe = self.observer.tensor
        model_input, timestep = self.model_input(index, latents, extra)
        observe("latent_model_input", model_input, step=loop)
        observe("timestep", timestep, step=loop)
        with self._invocation("unet") as taps:
            prediction = self.unet(model_input, timestep, context, taps=taps)
        if self.guided:
            uncond, text = self.ops.chunk(prediction, 2, 0)
            observe("noise_pred_uncond", uncond, step=loop)
            observe("noise_pred_text", text, step=loop)
            prediction = self.guided_prediction(uncond, text)
        observe("noise_pred", prediction, step=loop)
        noise = None
        if self.sampler.needs_noise(index):
            noise = self.ops.asarray(self.request.noise("step", loop, tuple(latents.shape)))
            observe("noise", noise, step=loop)
        latents = self.sampler_step(index, prediction, latents, noise)
        observe("step_output", latents, step=loop)
        if self.kind == "inpaint" and self.in_channels == 4:
            latents = self._blend(loop, index, latents, extra)
        observe("latents", latents, step=loop)
        return latents

    def model_input(self, index: int, latents, extra: dict):
        """Stage: (the UNet's input, its timestep) for sampler index `index`: the latents doubled for
        guidance, scaled for the sampler, with an inpainting UNet's mask and image latents appended."""
        ops = self.ops
        model_input = ops.cat([latents, latents], 0) if self.guided else latents
        model_input = ops.cast(self.sampler.scale_model_input(model_input, index))
        if self.in_channels == 9:
            model_input = ops.cat([model_input, ops.asarray(extra["mask"]), ops.asarray(extra["masked_image_latents"])], 1)
        return model_input, np.asarray([self.sampler.timesteps[index]])

    def guided_prediction(self, uncond, text):
        """Stage: classifier-free guidance of the two halves of the UNet's prediction."""
        return self.ops.cast(self.sd.guide(uncond, text, self.request.guidance))

    def sampler_step(self, index: int, prediction, latents, noise=None):
        """Stage: the sampler's step from the latents at index `index` to the next ones."""
        return self.ops.cast(self.sampler.step(prediction, index, latents, noise=noise))

    def decode_input(self, latents):
        """Stage: the VAE decoder's input from the final latents."""
        return self.ops.cast(self.sd.decode_input(latents))

    def _blend(self, loop: int, index: int, latents, extra: dict):
        """Standard-model inpainting: outside the mask, the init latents noised to the next timestep."""
        ops = self.ops
        known = extra["image_latents"]
        mask = ops.chunk(extra["mask"], 2, 0)[0] if self.guided else extra["mask"]
        if index + 1 < len(self.sampler.timesteps):
            known = self.noised(known, extra["noise"], index + 1, step=loop)
        return ops.cast((1 - mask) * known + mask * latents)

    @contextmanager
    def _invocation(self, component: str) -> Iterator[Any]:
        with self.observer.component(component) as taps:
            yield taps
