"""Loading a diffusers folder's networks (SD 1.x, 2.x or SDXL: impl.families) for a backend and dtype.

    ops = get_ops("torch", "fp32")                  # or get_ops("numpy", "fp16"), ...
    models = load_models(folder, ops)               # the family's networks, found by detect_family(folder)
    models.component("text_encoder_2")              # any network by its run-file component name
    text_encoder = load_text_encoder(folder, ops)   # impl.clip.ClipTextModel (component="text_encoder_2": SDXL's)
    unet = load_unet(folder, ops)                   # impl.unet.UNet
    vae = load_vae(folder, ops)                     # impl.vae.AutoencoderKL: .decoder, .encoder

`folder` is the model folder (with text_encoder/, unet/, vae/, ...) or the component folder itself.
Weights come memory-mapped through impl.tensor_files; when the file dtype is the storage dtype they
are used in place (NumPy views / torch.from_numpy of those views), otherwise converted once to the
storage dtype (no float32 copy of a half-precision model is ever made). A family whose pipeline runs
the VAE at float32 under half-precision weights (SDXL's force_upcast) gets that VAE half at float32.

Calling a component: `text_encoder(ids)` -> the reference's output dict, `text_encoder.embed(ids, embedder)`
-> (context, pooled) for a family's TextEmbedder, `unet(sample, t, context[, added_cond_kwargs])` ->
model output, `vae.decode(z)` -> image, `vae.encode(x)` -> (mean, logvar),
`vae.encoder.sample(mean, logvar, noise)`. Every call takes `taps=` (impl.scope.Taps) and every
component has the block API of impl.scope.Component (`block_names()`, `block(path)(**inputs)`,
`run_block(path, inputs, taps)`). A loaded model serves one call at a time (the taps binding and the
NumPy scratch buffers are per model).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .clip import ClipTextModel
from .errors import ModelInputError
from .families import COMPONENTS, Family, TextEmbedder, detect_family
from .ops import Ops, at_dtype, get_ops
from .ops.numpy_ops import storage_dtype
from .unet import UNet
from .vae import AutoencoderKL, VaeConfig
from .weights import WeightStore


def component_folder(folder: str | Path, component: str) -> Path:
    """`folder/component` when it exists, else `folder` itself if it holds a config.json."""
    folder = Path(folder)
    if (folder / component / "config.json").is_file():
        return folder / component
    if (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        return folder
    raise ModelInputError(f"{folder} has no {component}/config.json; pass a diffusers SD folder "
                          f"(with {component}/) or the {component} folder itself")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelInputError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelInputError(f"{path} is not a JSON object")
    return config


def _store(folder: Path) -> WeightStore:
    from .tensor_files import open_component

    return WeightStore(open_component(folder), source=str(folder))


def _ops(ops: Ops | str | None, dtype: str | None) -> Ops:
    if isinstance(ops, Ops):
        if dtype is not None and dtype != ops.dtype:
            raise ModelInputError(f"dtype {dtype!r} given with ops of dtype {ops.dtype!r}")
        return ops
    return get_ops(ops or "numpy", dtype or "fp32")


def load_text_encoder(folder: str | Path, ops: Ops | str | None = None, dtype: str | None = None,
                      component: str = "text_encoder", embedder: TextEmbedder | None = None) -> ClipTextModel:
    """The text encoder `component` (text_encoder, or SDXL's text_encoder_2 with its projection); with the
    family's `embedder` for it, its calls return the hidden states whenever the embedder needs them."""
    spec = COMPONENTS.get(component)
    if spec is None or not spec.model.startswith("clip_text"):
        raise ModelInputError(f"{component!r} is not a text encoder component")
    path = component_folder(folder, spec.folder)
    needs_hidden = embedder is not None and not (embedder.hidden_layer == -1 and embedder.final_norm)
    return ClipTextModel(read_config(path), _store(path), _ops(ops, dtype),
                         projection=spec.model == "clip_text_with_projection", name=component,
                         output_hidden_states=needs_hidden)


def load_unet(folder: str | Path, ops: Ops | str | None = None, dtype: str | None = None) -> UNet:
    path = component_folder(folder, "unet")
    return UNet(read_config(path), _store(path), _ops(ops, dtype))


class _Upcast:
    """The float32 op set of a network loaded at `dtype` and then moved to float32 (diffusers'
    `vae.to(torch.float32)`): its weights are the file's rounded to `dtype`, held at float32."""

    def __init__(self, ops: Ops, dtype: str):
        self._ops = at_dtype(ops, "fp32")
        self._rounding = storage_dtype(dtype)

    def __getattr__(self, name: str):
        return getattr(self._ops, name)

    def weight(self, array):
        return self._ops.weight(np.asarray(array).astype(self._rounding).astype(np.float32))


def load_vae(folder: str | Path, ops: Ops | str | None = None, dtype: str | None = None,
             parts: tuple[str, ...] = ("encoder", "decoder"), float32_parts: tuple[str, ...] = ()) -> AutoencoderKL:
    """The VAE; the halves in `float32_parts` run at float32 whatever `ops`'s dtype, on weights rounded to
    that dtype (as a pipeline that upcasts a VAE loaded at half precision has them)."""
    path = component_folder(folder, "vae")
    ops = _ops(ops, dtype)
    return AutoencoderKL(read_config(path), _store(path), ops, parts=parts,
                         part_ops={part: _Upcast(ops, ops.dtype) for part in float32_parts})


@dataclass
class StableDiffusionModels:
    """A family's networks on one backend and dtype. `networks` maps run-file component names to the
    Component computing them (None for a VAE half that was not loaded)."""

    family: Family
    text_encoders: dict[str, ClipTextModel]  # by component name, in the family's conditioning order
    unet: UNet
    vae: AutoencoderKL
    ops: Ops

    @property
    def text_encoder(self) -> ClipTextModel:
        return self.text_encoders["text_encoder"]

    @property
    def networks(self) -> dict[str, Any]:
        by_model = {"unet": self.unet, "vae_encoder": self.vae.encoder, "vae_decoder": self.vae.decoder}
        return {c.name: self.text_encoders[c.name] if c.model.startswith("clip_text") else by_model[c.model]
                for c in self.family.components}

    def component(self, name: str):
        """The component behind a run-file component name (text_encoder, unet, vae_decoder, ...)."""
        networks = self.networks
        if networks.get(name) is None:
            raise ModelInputError(f"no component {name!r}; use one of {', '.join(k for k, v in networks.items() if v)}")
        return networks[name]


def load_models(folder: str | Path, ops: Ops | str | None = None, dtype: str | None = None,
                vae_parts: tuple[str, ...] = ("encoder", "decoder"), family: Family | None = None) -> StableDiffusionModels:
    """Every network of the folder's family (detected from the folder unless given)."""
    ops = _ops(ops, dtype)
    family = family or detect_family(folder)
    text_encoders = {e.component: load_text_encoder(folder, ops, component=e.component, embedder=e)
                     for e in family.conditioning.embedders}
    vae_config = VaeConfig(read_config(component_folder(folder, "vae")))
    float32_parts = tuple(part for part in vae_parts if vae_config.force_upcast
                          and ops.dtype in family.vae_float32_at.get(f"vae_{part}", ()))
    return StableDiffusionModels(family, text_encoders, load_unet(folder, ops),
                                 load_vae(folder, ops, parts=vae_parts, float32_parts=float32_parts), ops)


__all__ = ["StableDiffusionModels", "component_folder", "load_models", "load_text_encoder", "load_unet",
           "load_vae", "read_config"]
