"""Stable Diffusion pipelines (txt2img, img2img, inpainting) over impl's networks and samplers, for every
model family of impl.families (SD 1.x, SD 2.x; SDXL txt2img and img2img).

    sd = StableDiffusion.from_folder("fixtures/models/tiny-sd1", backend="torch", dtype="fp32")
    pixels = sd(Request(prompt="a red cube", steps=20, sampler="ddim", x_T=noise))  # (B, H, W, 3) in [0, 1]

The family's conditioning is data (impl.families.Conditioning): each text embedder's tokenizer and
encoder give a context (concatenated on the channel axis) and possibly the pooled text embedding, and
the added conditions (SDXL's text_time: pooled embeds and add_time_ids) go to the UNet alongside.
Every random draw comes from the request's `noise` source: the initial noise is `x_T` (a file, not an
RNG), and the sampler's and VAE posterior's draws are asked for by (kind, index), so a parity run can
replay the reference's recorded draws and a standalone run can draw them from a seed.
An `Observer` sees each component invocation (and gives it taps) and each pipeline-level tensor,
named as in the run-file format (docs/run-format.md): token ids per embedder (`token_ids`,
`token_ids_2`, and `negative_...`), and for SDXL `add_text_embeds` and `add_time_ids` as they enter the
UNet (diffusers' variable names).

Left out: SDXL inpainting, the refiner's aesthetic-score conditioning (requires_aesthetics_score),
denoising_start/denoising_end, separate prompts for the second text encoder (prompt_2).

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
from .families import detect_family
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
    negative_prompt: str | list[str] | None = None  # None: the empty prompt, or zeros (SDXL's force_zeros)
    steps: int = 20
    sampler: str = "ddim"
    guidance: float = 7.5
    guidance_rescale: float = 0.0  # "Common Diffusion Noise Schedules..." sec. 3.4 (txt2img; SDXL img2img too)
    eta: float = 0.0
    karras: bool = False
    x_T: np.ndarray | None = None  # (prompts * images_per_prompt, C, H/8, W/8)
    images_per_prompt: int = 1
    height: int = 512
    width: int = 512
    init_image: Any = None  # PIL RGB image: img2img and inpainting
    mask: Any = None  # PIL mask image: inpainting (white = repaint)
    strength: float = 1.0
    # SDXL micro-conditioning, each (height, width) or (top, left); sizes default to the run's
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
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
    """A model folder's pipelines. `conditioning` (the family's, impl.families) and `add_time_ids` are
    what the pipeline conditions on, kept as attributes so that a run can swap them (fault injection)."""

    def __init__(self, models: StableDiffusionModels, tokenizers: dict[str, Tokenizer], scheduler_config: dict,
                 pipeline_options: dict | None = None):
        self.models = models
        self.family = models.family
        self.conditioning = models.family.conditioning
        self.ops = models.ops
        self.tokenizers = tokenizers
        self.scheduler_config = scheduler_config
        # the family's default, unless the folder's model_index.json says otherwise (families without
        # the option never zero)
        default = self.conditioning.force_zeros_for_empty_prompt
        self.force_zeros_for_empty_prompt = default is not None and bool(
            (pipeline_options or {}).get("force_zeros_for_empty_prompt", default))

    @classmethod
    def from_folder(cls, folder: str | Path, backend: str = "numpy", dtype: str = "fp32", **ops_options):
        folder = Path(folder)
        config_path = folder / "scheduler" / "scheduler_config.json"
        if not config_path.is_file():
            raise ModelInputError(f"{folder} has no scheduler/scheduler_config.json; pass a diffusers SD folder")
        family = detect_family(folder)
        models = load_models(folder, get_ops(backend, dtype, **ops_options), family=family)
        tokenizers = {name: Tokenizer.from_folder(folder / name) for name in family.tokenizers}
        index = json.loads((folder / "model_index.json").read_text())
        return cls(models, tokenizers, json.loads(config_path.read_text()),
                   {k: v for k, v in index.items() if k in family.pipeline_options})

    @property
    def tokenizer(self) -> Tokenizer:
        return self.tokenizers[self.conditioning.embedders[0].tokenizer]

    def sampler(self, name: str, steps: int, eta: float = 0.0, karras: bool = False):
        """The sampler for a run, configured from the model's scheduler config."""
        return make_sampler(name, self.scheduler_config, steps, eta=eta, karras=karras)

    @staticmethod
    def guide(uncond, text, scale: float):
        """Classifier-free guidance, in the reference's order of operations."""
        return uncond + scale * (text - uncond)

    def rescale_guidance(self, guided, text, rescale: float):
        """diffusers' rescale_noise_cfg: the guided prediction rescaled to the text prediction's standard
        deviation per sample, mixed with the unrescaled one by `rescale`."""
        axes = tuple(range(1, len(text.shape)))
        rescaled = guided * (self.ops.std(text, axes) / self.ops.std(guided, axes))
        return rescale * rescaled + (1 - rescale) * guided

    def add_time_ids(self, original_size, crops_coords_top_left, target_size) -> list[float]:
        """The micro-conditioning numbers, in the order the family's added conditions name them."""
        pairs = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                 "target_size": target_size}
        return [float(v) for name in self.conditioning.added.time_ids for v in pairs[name]]

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
        family = sd.family
        if self.kind not in family.pipelines:
            raise ModelInputError(f"{family.title} has no {self.kind} pipeline here; it has "
                                  f"{', '.join(family.pipelines)}")
        if self.kind == "txt2img" and self.in_channels != 4:
            raise ModelInputError(f"this UNet takes {self.in_channels} input channels (an inpainting model); "
                                  "run it with an init image and a mask")
        if request.guidance_rescale and self.kind not in family.guidance_rescale:
            raise ModelInputError(f"guidance_rescale is not part of {family.title}'s {self.kind} pipeline "
                                  f"(only {', '.join(family.guidance_rescale)}); leave it at 0")
        self.posterior_draws = 0
        self.sampler = sd.sampler(request.sampler, request.steps, eta=request.eta, karras=request.karras)

    # --- stages ----------------------------------------------------------------------------------
    def execute(self) -> np.ndarray:
        request = self.request
        x_t = self._initial_noise()
        self.observer.tensor("x_T", x_t)
        context, added = self._encode_prompts()
        start = self.start_index
        latents, extra = self._initial_latents(x_t, start)
        total = len(self.sampler.timesteps) - start
        for loop in range(total):
            latents = self._denoise(loop, start + loop, latents, context, added, extra)
            self.observer.progress(loop + 1, total)
        return self._decode(latents)

    def _initial_noise(self):
        request, scale = self.request, self.sd.vae_scale
        shape = (self.batch, self.vae.config.latent_channels, request.height // scale, request.width // scale)
        if request.height % scale or request.width % scale:
            raise ModelInputError(f"height and width must be multiples of {scale}; got {request.height}x{request.width}")
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
        """(context, added_cond_kwargs or None) for the request's prompts, token ids observed per embedder."""
        request = self.request
        ids = self._token_ids(request.prompts, "")
        negative_ids = None
        if self.guided and not (request.negative_prompt is None and self.sd.force_zeros_for_empty_prompt):
            negative_ids = self._token_ids(request.negative_prompts, "negative_")
        return self.prompt_context(ids, negative_ids)

    def _token_ids(self, prompts: list[str], role: str) -> dict[str, Any]:
        """Each embedder's token ids for `prompts`, keyed by their run-file name (token_ids, token_ids_2)."""
        ids = {}
        for embedder in self.sd.conditioning.embedders:
            ids[embedder.token_ids] = self.sd.tokenizers[embedder.tokenizer](prompts)
            self.observer.tensor(role + embedder.token_ids, ids[embedder.token_ids])
        return ids

    def prompt_context(self, ids: dict[str, Any], negative_ids: dict[str, Any] | None = None):
        """Stage: (the UNet's context, its added conditions or None) from each embedder's token ids (keyed
        by run-file name): [negative; prompt] when guided, each repeated per image as diffusers does. Guided
        without negative ids (force_zeros_for_empty_prompt, no negative prompt), the negative half is zeros."""
        ops = self.ops
        context, pooled = self._embed(ids)
        if self.guided:
            if negative_ids is None:
                if not self.sd.force_zeros_for_empty_prompt:
                    raise ModelInputError("a guided run needs the negative prompt's token ids")
                negative, negative_pooled = (None if x is None else ops.asarray(np.zeros(x.shape, np.float32))
                                             for x in (context, pooled))
            else:
                negative, negative_pooled = self._embed(negative_ids)
            context = self.sd.cfg_batch(negative, context)
            pooled = None if pooled is None else self.sd.cfg_batch(negative_pooled, pooled)
        return context, self._added_conditions(pooled)

    def _embed(self, ids: dict[str, Any]):
        """The family's embedders on their token ids: (concatenated contexts, pooled embedding or None), per image."""
        contexts, pooled = [], None
        for embedder in self.sd.conditioning.embedders:
            with self._invocation(embedder.component) as taps:
                hidden, pool = self.sd.models.text_encoders[embedder.component].embed(
                    np.asarray(ids[embedder.token_ids]), embedder, taps=taps)
            contexts.append(hidden)
            pooled = pool if pool is not None else pooled
        context = contexts[0] if len(contexts) == 1 else self.ops.cat(contexts, -1)
        return self._per_image(context), None if pooled is None else self._per_image(pooled)

    def _added_conditions(self, pooled) -> dict | None:
        """The UNet's added_cond_kwargs (SDXL's text_time: pooled text embeds and add_time_ids), or None."""
        added = self.sd.conditioning.added
        if added is None:
            return None
        if added.kind != "text_time" or pooled is None:
            raise ModelInputError(f"added conditions {added.kind!r} need a pooled text embedding; the family's "
                                  "conditioning gives none")
        ops, request = self.ops, self.request
        size = (request.height, request.width)
        ids = self.sd.add_time_ids(request.original_size or size, request.crops_coords_top_left,
                                   request.target_size or size)
        time_ids = ops.asarray(np.asarray([ids], dtype=np.float32))
        if self.guided:
            time_ids = ops.cat([time_ids, time_ids], 0)  # the negative prompt's are the same
        time_ids = ops.cat([time_ids] * self.batch, 0)
        self.observer.tensor("add_text_embeds", pooled)
        self.observer.tensor("add_time_ids", time_ids)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def _per_image(self, embeddings):
        """Each prompt's row repeated images_per_prompt times in place (diffusers' repeat + view)."""
        copies = self.request.images_per_prompt
        if copies == 1:
            return embeddings
        ops = self.ops
        batch, *rest = embeddings.shape
        return ops.reshape(ops.cat([ops.reshape(embeddings, (batch, 1, *rest))] * copies, 1),
                           (batch * copies, *rest))

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
        return self.ops.cast(self.sampler.initial_latents(x_t))

    def _encode_image(self, image):
        """VAE posterior sample times the scaling factor, with the posterior's noise drawn in order."""
        encoder = self.vae.encoder
        with self._invocation("vae_encoder") as taps:
            mean, logvar = self.vae.encode(image, taps)
        index = self.posterior_draws
        self.posterior_draws += 1
        noise = encoder.ops.asarray(self.request.noise("posterior", index, tuple(mean.shape)))
        self.observer.tensor("posterior_noise" if index == 0 else f"posterior_noise#{index}", noise)
        return self.encoded_latents(mean, logvar, noise)

    def encoded_latents(self, mean, logvar, noise):
        """Stage: image latents from the VAE encoder's posterior (mean, logvar): a sample with the given
        standard normal `noise`, times the VAE's scaling factor, repeated per image. An encoder kept at
        float32 (SDXL's force_upcast) samples at float32, and its sample comes back to the storage dtype
        before the scaling, as diffusers does."""
        ops, encoder = self.ops, self.vae.encoder
        sample = encoder.sample(*(encoder.ops.asarray(x) for x in (mean, logvar, noise)))
        latents = ops.cast(self.vae.scaling_factor * ops.asarray(sample))
        copies = self.batch // latents.shape[0]
        return ops.cat([latents] * copies, 0) if copies > 1 else latents

    def noised(self, latents, noise, index: int, step: int | None = None):
        """Stage: `latents` diffused with `noise` to the level sampler index `index` starts from."""
        result = self.ops.cast(self.sampler.add_noise(latents, noise, index))
        self.observer.tensor("add_noise_original", latents, step=step)
        self.observer.tensor("add_noise_output", result, step=step)
        return result

    def _denoise(self, loop: int, index: int, latents, context, added, extra: dict):
        """One denoising step: diffusers' loop body, tensor for tensor."""
        observe = self.observer.tensor
        model_input, timestep = self.model_input(index, latents, extra)
        observe("latent_model_input", model_input, step=loop)
        observe("timestep", timestep, step=loop)
        with self._invocation("unet") as taps:
            prediction = self.unet(model_input, timestep, context, added, taps=taps)
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
        """Stage: classifier-free guidance of the two halves of the UNet's prediction, rescaled when the
        request asks for guidance_rescale."""
        prediction = self.ops.cast(self.sd.guide(uncond, text, self.request.guidance))
        if self.request.guidance_rescale > 0:
            prediction = self.ops.cast(self.sd.rescale_guidance(prediction, text, self.request.guidance_rescale))
        return prediction

    def sampler_step(self, index: int, prediction, latents, noise=None):
        """Stage: the sampler's step from the latents at index `index` to the next ones."""
        return self.ops.cast(self.sampler.step(prediction, index, latents, noise=noise))

    def decode_input(self, latents):
        """Stage: the VAE decoder's input from the final latents, in the decoder's dtype: a decoder kept at
        float32 (SDXL's force_upcast) takes the latents upcast before the division, as diffusers does."""
        ops = self.vae.decoder.ops
        return ops.cast(self.sd.decode_input(ops.asarray(latents)))

    def _blend(self, loop: int, index: int, latents, extra: dict):
        """Standard-model inpainting: outside the mask, the init latents noised to the next timestep."""
        ops = self.ops
        known = extra["image_latents"]
        mask = ops.chunk(extra["mask"], 2, 0)[0] if self.guided else extra["mask"]
        if index + 1 < len(self.sampler.timesteps):
            known = self.noised(known, extra["noise"], index + 1, step=loop)
        return ops.cast((1 - mask) * known + mask * latents)

    def _decode(self, latents) -> np.ndarray:
        """The final latents decoded, as pixels in [0, 1]."""
        with self._invocation("vae_decoder") as taps:
            decoded = self.vae.decode(self.decode_input(latents), taps)
        ops = self.vae.decoder.ops
        return to_pixels(ops.to_numpy(ops.clamp(ops.scale_shift(decoded, 0.5, 0.5), 0.0, 1.0)))

    @contextmanager
    def _invocation(self, component: str) -> Iterator[Any]:
        with self.observer.component(component) as taps:
            yield taps
