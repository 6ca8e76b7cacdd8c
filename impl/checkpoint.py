"""Original single-file SD 1.x checkpoints (CompVis/LDM layout): load as diffusers-named components, convert both ways.

A single file holds weights only. The architecture is read off tensor shapes; what shapes cannot
tell (attention heads, sample sizes, activation...) takes SD 1.5's published values unless the
caller passes configs, either a diffusers folder or {component: {field: value}} overrides.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .errors import ModelInputError
from .families import DIFFUSERS_VERSION, SD1
from .ldm_keys import COMPONENTS, IGNORED_KEYS, LDM_PREFIX, POSITION_IDS, key_map
from .tensor_files import open_component, open_tensor_file, write_checkpoint, write_safetensors

WEIGHT_FILE = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
               "text_encoder": "model.safetensors"}
TEXT_MODEL_PREFIX = "text_model."
CLIP_HEAD_DIM = 64

# SD 1.5's published config values for the fields tensor shapes do not determine.
SD1_DEFAULTS = {
    "unet": {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
             "attention_head_dim": 8, "center_input_sample": False, "downsample_padding": 1,
             "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
             "norm_num_groups": 32, "sample_size": 64},
    "vae": {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215},
    "text_encoder": {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
                     "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "initializer_factor": 1.0,
                     "initializer_range": 0.02, "layer_norm_eps": 1e-05, "model_type": "clip_text_model",
                     "pad_token_id": 1},
}
SD1_SCHEDULER = SD1.scheduler  # SD 1.5's published scheduler config (the model-family registry's)
INPAINT_IN_CHANNELS = 9  # latents + mask + masked-image latents
SHOWN_PER_KIND = 5


@dataclass(frozen=True)
class Component:
    config: dict
    tensors: Mapping[str, np.ndarray]  # diffusers names; views of the source file, not copies


@dataclass(frozen=True)
class SingleFileModel:
    unet: Component
    vae: Component
    text_encoder: Component


class _ShapeReader:
    """Shapes of one component's tensors in an LDM file, by name without the component prefix."""

    def __init__(self, source: Mapping[str, np.ndarray], component: str, path: Path):
        self.source, self.prefix, self.component, self.path = source, LDM_PREFIX[component], component, path

    def has(self, key: str) -> bool:
        return self.prefix + key in self.source

    def __call__(self, key: str) -> tuple[int, ...]:
        if not self.has(key):
            raise ModelInputError(f"cannot infer the {self.component} architecture of {self.path}: tensor "
                                  f"{self.prefix + key} is missing. Is this an SD 1.x checkpoint?")
        return tuple(self.source[self.prefix + key].shape)

    def indices(self, pattern: str) -> list[int]:
        """The distinct numbers `(\\d+)` takes in `pattern` over the component's tensor names."""
        regex = re.compile(re.escape(self.prefix) + pattern)
        found = sorted({int(m.group(1)) for key in self.source if (m := regex.match(key))})
        if not found:
            raise ModelInputError(f"cannot infer the {self.component} architecture of {self.path}: no tensor "
                                  f"matches {self.prefix}{pattern}. Is this an SD 1.x checkpoint?")
        return found


def _infer_unet(shape: _ShapeReader) -> dict:
    blocks = shape.indices(r"input_blocks\.(\d+)\.")
    # input_blocks: conv_in, then per level its resnets and (except the last level) one downsampler.
    downsamplers = [n for n in blocks if shape.has(f"input_blocks.{n}.0.op.weight")]
    per_level = downsamplers[0] - 1 if downsamplers else len(blocks) - 1
    levels = len(blocks) // (per_level + 1)
    first_of_level = [1 + level * (per_level + 1) for level in range(levels)]
    if len(shape("middle_block.1.proj_in.weight")) != 4:
        raise ModelInputError(f"{shape.path} has linear attention projections (SD 2.x); only SD 1.x is supported")
    conv_in = shape("input_blocks.0.0.weight")
    return {
        "in_channels": conv_in[1], "out_channels": shape("out.2.weight")[0], "layers_per_block": per_level,
        "block_out_channels": [shape(f"input_blocks.{n}.0.out_layers.3.weight")[0] for n in first_of_level],
        "cross_attention_dim": shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        "down_block_types": ["CrossAttnDownBlock2D" if shape.has(f"input_blocks.{n}.1.proj_in.weight")
                             else "DownBlock2D" for n in first_of_level],
        # Up level i starts at output_blocks.{i(n+1)}, one before the first input block of down level i.
        "up_block_types": ["CrossAttnUpBlock2D" if shape.has(f"output_blocks.{n - 1}.1.proj_in.weight")
                           else "UpBlock2D" for n in first_of_level],
    }


def _infer_vae(shape: _ShapeReader) -> dict:
    levels = len(shape.indices(r"encoder\.down\.(\d+)\."))
    return {
        "in_channels": shape("encoder.conv_in.weight")[1], "out_channels": shape("decoder.conv_out.weight")[0],
        "latent_channels": shape("post_quant_conv.weight")[0],
        "layers_per_block": len(shape.indices(r"encoder\.down\.0\.block\.(\d+)\.")),
        "block_out_channels": [shape(f"encoder.down.{level}.block.0.conv2.weight")[0] for level in range(levels)],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def _infer_text_encoder(shape: _ShapeReader) -> dict:
    vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
    dtype = shape.source[shape.prefix + "text_model.embeddings.token_embedding.weight"].dtype
    return {
        "vocab_size": vocab, "hidden_size": hidden, "projection_dim": hidden,
        "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0],
        "num_hidden_layers": len(shape.indices(r"text_model\.encoder\.layers\.(\d+)\.")),
        "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        # SD 1.x's CLIP ViT-L/14 text model has 64-wide heads; other widths need the count from the caller.
        "num_attention_heads": hidden // CLIP_HEAD_DIM if hidden % CLIP_HEAD_DIM == 0 else None,
        "torch_dtype": str(dtype),
    }


_INFER: dict[str, Callable[[_ShapeReader], dict]] = {
    "unet": _infer_unet, "vae": _infer_vae, "text_encoder": _infer_text_encoder}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelInputError(f"{path} does not exist; a diffusers SD folder has unet/, vae/ and text_encoder/ "
                              "each with a config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelInputError(f"{path} is not valid JSON: {err}") from err


def _user_configs(config: str | Path | Mapping[str, dict] | None) -> dict[str, dict]:
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        return {component: _read_json(Path(config) / component / "config.json") for component in COMPONENTS}
    unknown = set(config) - set(COMPONENTS)
    if unknown:
        raise ModelInputError(f"config has unknown components {sorted(unknown)}; "
                              f"expected some of {', '.join(COMPONENTS)}")
    return {component: dict(fields) for component, fields in config.items()}


def _component_config(source: Mapping[str, np.ndarray], component: str, user: dict, path: Path) -> dict:
    prefix = LDM_PREFIX[component]
    if not any(key.startswith(prefix) for key in source):
        raise ModelInputError(f"{path} has no {component} tensors (names starting with {prefix!r}); "
                              "only full SD 1.x checkpoints (UNet, VAE and CLIP text encoder) are supported")
    config = {**SD1_DEFAULTS[component], **_INFER[component](_ShapeReader(source, component, path)), **user}
    if component == "text_encoder" and config["num_attention_heads"] is None:
        raise ModelInputError(f"{path}: the text encoder's width {config['hidden_size']} is not a multiple of "
                              f"SD 1.x's {CLIP_HEAD_DIM}-wide heads; pass "
                              "config={'text_encoder': {'num_attention_heads': N}}")
    return config


def _check_layout(what: str, found: Mapping[str, tuple[int, ...]],
                  expected: Mapping[str, tuple[tuple[int, ...], ...]], hint: str) -> None:
    """One error for every missing, unexpected and mis-shaped tensor (`expected`: name -> allowed shapes)."""
    found = {name: shape for name, shape in found.items() if not IGNORED_KEYS.search(name)}
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    misshaped = [f"{name} {list(found[name])} (expected {' or '.join(str(list(s)) for s in expected[name])})"
                 for name in expected if name in found and found[name] not in expected[name]]
    parts = [f"{len(items)} {kind} ({', '.join(items[:SHOWN_PER_KIND] + ['...'] * (len(items) > SHOWN_PER_KIND))})"
             for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
    if parts:
        raise ModelInputError(f"{what} does not match the SD 1.x layout of its config: "
                              f"{'; '.join(parts)} tensors. {hint}")


def load_single_file(path: str | Path, config: str | Path | Mapping[str, dict] | None = None) -> SingleFileModel:
    """The UNet, VAE and text encoder of an LDM-layout checkpoint, with diffusers configs and tensor names.

    `config`: a diffusers folder whose unet/vae/text_encoder config.json are used as given, or
    {component: {field: value}} overriding inferred fields; either way the tensors are checked against it.
    """
    path = Path(path)
    source = open_tensor_file(path)
    user = _user_configs(config)
    configs = {c: _component_config(source, c, user.get(c, {}), path) for c in COMPONENTS}
    rules = {c: key_map(c, configs[c]) for c in COMPONENTS}
    expected = {rule.ldm: (rule.ldm_shape, rule.shape) if rule.conv1x1 else (rule.shape,)
                for component_rules in rules.values() for rule in component_rules.values()}
    _check_layout(str(path), {name: source[name].shape for name in source}, expected,
                  "Check that the file is an SD 1.x checkpoint, or pass config= with the model's diffusers configs.")
    return SingleFileModel(**{c: Component(configs[c], {name: source[rule.ldm].reshape(rule.shape)
                                                         for name, rule in rules[c].items()}) for c in COMPONENTS})


def _folder_tensors(folder: Path, component: str) -> Mapping[str, np.ndarray]:
    tensors = open_component(folder / component)
    if component != "text_encoder":
        return tensors
    # transformers >= 5 saves CLIPTextModel without the "text_model." prefix that published SD folders have.
    return {name if name.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + name: array
            for name, array in tensors.items()}


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def folder_to_single_file(folder: str | Path, out_path: str | Path) -> None:
    """Write a diffusers SD 1.x folder's UNet, VAE and text encoder as one LDM-layout file: .safetensors, or
    .ckpt (a PyTorch checkpoint {"state_dict": ...} holding tensors only, as original SD releases are)."""
    folder, out_path = Path(folder), Path(out_path)
    if out_path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelInputError(f"{out_path}: single files are written as .safetensors or .ckpt")
    found, expected, rules, sources = {}, {}, {}, {}
    for component in COMPONENTS:
        rules[component] = key_map(component, _read_json(folder / component / "config.json"))
        sources[component] = _folder_tensors(folder, component)
        found.update({f"{component}/{name}": array.shape for name, array in sources[component].items()})
        expected.update({f"{component}/{name}": (rule.shape,) for name, rule in rules[component].items()})
    _check_layout(str(folder), found, expected, "Check that each component's weights belong to its config.json.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {rule.ldm: sources[c][name].reshape(rule.ldm_shape) for c in COMPONENTS for name, rule in rules[c].items()}
    positions = rules["text_encoder"]["text_model.embeddings.position_embedding.weight"].shape[0]
    tensors[POSITION_IDS] = np.arange(positions, dtype=np.int64)[None]
    (write_safetensors if out_path.suffix == ".safetensors" else write_checkpoint)(out_path, tensors)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def single_file_to_folder(path: str | Path, out_folder: str | Path,
                          config: str | Path | Mapping[str, dict] | None = None,
                          tokenizer: str | Path | None = None) -> None:
    """Write an LDM-layout checkpoint as a diffusers folder (configs, safetensors, scheduler, tokenizer).

    A single file has no tokenizer: it is copied from `tokenizer` (a folder with vocab.json and
    merges.txt), else from `config`'s tokenizer/ when `config` is a folder. The scheduler and
    model_index.json come from `config`'s folder too, else SD 1.5's are written.
    """
    out_folder = Path(out_folder)
    if out_folder.exists() and any(out_folder.iterdir()):
        raise ModelInputError(f"{out_folder} exists and is not empty; choose a new folder")
    config_folder = Path(config) if isinstance(config, (str, Path)) else None
    tokenizer_folder = Path(tokenizer) if tokenizer else config_folder / "tokenizer" if config_folder else None
    if tokenizer_folder is None or not all((tokenizer_folder / f).is_file() for f in ("vocab.json", "merges.txt")):
        raise ModelInputError(f"no tokenizer for {out_folder}: a single-file checkpoint has none; pass tokenizer= a "
                              "folder with CLIP's vocab.json and merges.txt (the tokenizer/ of any SD 1.x model)"
                              + (f"; {tokenizer_folder} lacks them" if tokenizer_folder else ""))
    model = load_single_file(path, config)
    tmp = out_folder.with_name(f".{out_folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(tokenizer_folder, tmp / "tokenizer")
        if config_folder and (config_folder / "scheduler").is_dir():
            shutil.copytree(config_folder / "scheduler", tmp / "scheduler")
        else:
            _write_json(tmp / "scheduler" / "scheduler_config.json", SD1_SCHEDULER)
        if config_folder and (config_folder / "model_index.json").is_file():
            shutil.copy2(config_folder / "model_index.json", tmp / "model_index.json")
        else:
            inpaint = model.unet.config["in_channels"] == INPAINT_IN_CHANNELS
            _write_json(tmp / "model_index.json", SD1.model_index(SD1.pipelines["inpaint" if inpaint else "txt2img"]))
        for component in COMPONENTS:
            part = getattr(model, component)
            _write_json(tmp / component / "config.json", part.config)
            write_safetensors(tmp / component / WEIGHT_FILE[component], part.tensors)
        if out_folder.exists():
            out_folder.rmdir()
        os.replace(tmp, out_folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
