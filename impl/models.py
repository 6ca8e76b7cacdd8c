"""Loading a diffusers SD 1.x folder's networks for a backend and dtype.

    ops = get_ops("torch", "fp32")                  # or get_ops("numpy", "fp16"), ...
    text_encoder = load_text_encoder(folder, ops)   # impl.clip.ClipTextModel
    unet = load_unet(folder, ops)                   # impl.unet.UNet
    vae = load_vae(folder, ops)                     # impl.vae.AutoencoderKL: .decoder, .encoder

`folder` is the model folder (with text_encoder/, unet/, vae/) or the component folder itself.
Weights come memory-mapped through impl.tensor_files; when the file dtype is the storage dtype they
are used in place (NumPy views / torch.from_numpy of those views), otherwise converted once to the
storage dtype (no float32 copy of a half-precision model is ever made).

Calling a component: `text_encoder(ids)` -> {"last_hidden_state", "pooler_output"},
`text_encoder.encode(ids, clip_skip=0)` -> the UNet's conditioning, `unet(sample, t, context)` ->
noise prediction, `vae.decode(z)` -> image, `vae.encode(x)` -> (mean, logvar),
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

from .clip import ClipTextModel
from .errors import ModelInputError
from .ops import Ops, get_ops
from .unet import UNet
from .vae import AutoencoderKL
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


def load_text_encoder(folder: str | Path, ops: Ops | str | None = None, dtype: str | None = None) -> ClipTextModel:
    path = component_folder(folder, "text_encoder")
    return ClipTextModel(read_config(path), _store(path), _ops(ops, dtype))


def load_unet(folder: str | Path, ops: Ops | str | None = None, dtype: str | None = None) -> UNet:
    path = component_folder(folder, "unet")
    return UNet(read_config(path), _store(path), _ops(ops, dtype))


def load_vae(folder: str | Path, ops: Ops | str | None = None, dtype: str | None = None,
             parts: tuple[str, ...] = ("encoder", "decoder")) -> AutoencoderKL:
    path = component_folder(folder, "vae")
    return AutoencoderKL(read_config(path), _store(path), _ops(ops, dtype), parts=parts)


@dataclass
class StableDiffusionModels:
    text_encoder: ClipTextModel
    unet: UNet
    vae: AutoencoderKL
    ops: Ops

    def component(self, name: str):
        """The component behind a run-file component name (text_encoder, unet, vae_decoder, vae_encoder)."""
        table = {"text_encoder": self.text_encoder, "unet": self.unet,
                 "vae_decoder": self.vae.decoder, "vae_encoder": self.vae.encoder}
        if table.get(name) is None:
            raise ModelInputError(f"no component {name!r}; use one of {', '.join(k for k, v in table.items() if v)}")
        return table[name]


def load_models(folder: str | Path, ops: Ops | str | None = None, dtype: str | None = None,
                vae_parts: tuple[str, ...] = ("encoder", "decoder")) -> StableDiffusionModels:
    ops = _ops(ops, dtype)
    return StableDiffusionModels(load_text_encoder(folder, ops), load_unet(folder, ops),
                                 load_vae(folder, ops, parts=vae_parts), ops)


__all__ = ["StableDiffusionModels", "component_folder", "load_models", "load_text_encoder", "load_unet",
           "load_vae", "read_config"]
