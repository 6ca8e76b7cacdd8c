"""Embedded models and fixed inputs, generated locally and deterministically.

Weights are drawn with NumPy from a seed per (fixture, tensor name), so every run on every platform
writes byte-identical safetensors files. Tensor names and shapes come from the diffusers/transformers
model classes instantiated on the meta device (no memory, no download), so the folders have exactly
the layout of published SD 1.x folders.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

FIXTURES_DIR = Path(os.environ.get("SD_PARITY_FIXTURES", Path(__file__).resolve().parent.parent / "fixtures"))
MODELS_DIR = FIXTURES_DIR / "models"
NOISE_DIR = FIXTURES_DIR / "noise"
VOCAB_FILE = FIXTURES_DIR / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
PROMPTS_FILE = FIXTURES_DIR / "prompts.json"
DIFFUSERS_VERSION = "0.42.1"
FORMAT_TAG = "sd-parity-fixture-1"  # bump when the generator changes what it writes


class FixtureError(Exception):
    """Unknown fixture or a fixture that cannot be written."""


SCHEDULER_CONFIG = {  # SD 1.5's scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


def _unet(channels, down, up, layers, cross_dim, heads, sample_size, in_channels=4, groups=32):
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "attention_head_dim": heads, "block_out_channels": list(channels),
        "center_input_sample": False, "cross_attention_dim": cross_dim, "down_block_types": list(down),
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": in_channels,
        "layers_per_block": layers, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": groups,
        "out_channels": 4, "sample_size": sample_size, "up_block_types": list(up),
    }


def _vae(channels, layers, sample_size):
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "block_out_channels": list(channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels), "in_channels": 3,
        "latent_channels": 4, "layers_per_block": layers, "norm_num_groups": 32, "out_channels": 3,
        "sample_size": sample_size, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * len(channels),
    }


def _clip(hidden, intermediate, layers, heads, projection):
    return {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": hidden, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": intermediate, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": heads,
        "num_hidden_layers": layers, "pad_token_id": 1, "projection_dim": projection, "torch_dtype": "float32",
        "vocab_size": 49408,
    }


SD1_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

FIXTURES = {
    # The SD 1.x architecture shrunk: SD 1.5's four resolution levels and block types (cross-attention
    # in three down blocks, the mid block and three up blocks; the last down / first up block plain),
    # two layers per block, 32-64 channels, a 3-layer CLIP with the full vocabulary. At 64 px the
    # deepest level is 1x1, so the UNet uses 8 norm groups: with SD's 32, each GroupNorm would
    # normalise 2 values, and fp16 rounding alone would swing its output by O(1).
    "tiny-sd1": {
        "seed": 1, "default_size": 64,
        "unet": _unet((32, 32, 64, 64), SD1_DOWN, SD1_UP, 2, 32, 4, 8, groups=8),
        "vae": _vae((32, 32, 64, 64), 1, 64),
        "text_encoder": _clip(32, 64, 3, 4, 32),
    },
    # tiny-sd1 with the 9-channel UNet input of SD inpainting models (latents, mask, masked-image latents).
    "tiny-sd1-inpaint": {
        "seed": 2, "default_size": 64,
        "unet": _unet((32, 32, 64, 64), SD1_DOWN, SD1_UP, 2, 32, 4, 8, in_channels=9, groups=8),
        "vae": _vae((32, 32, 64, 64), 1, 64),
        "text_encoder": _clip(32, 64, 3, 4, 32),
    },
    # The exact SD 1.5 architecture with random weights (about 4 GB; generated on demand, never committed).
    "sd15-arch": {
        "seed": 15, "default_size": 512,
        "unet": _unet((320, 640, 1280, 1280), SD1_DOWN, SD1_UP, 2, 768, 8, 64),
        "vae": _vae((128, 256, 512, 512), 2, 512),
        "text_encoder": _clip(768, 3072, 12, 12, 768),
    },
}


def fixture_names() -> list[str]:
    return sorted(FIXTURES)


def fixture_path(name: str) -> Path:
    return MODELS_DIR / name


def default_size(model: str | Path) -> int:
    spec = FIXTURES.get(str(model))
    return spec["default_size"] if spec else 512


def ensure_fixture(name: str) -> Path:
    """The folder of fixture `name`, generated first if it is missing or was written by another generator."""
    if name not in FIXTURES:
        raise FixtureError(f"unknown fixture {name!r}; available: {', '.join(fixture_names())}")
    folder = fixture_path(name)
    stamp = folder / ".generated"
    if stamp.exists() and stamp.read_text() == _stamp(name):
        return folder
    generate(name, folder)
    return folder


def _stamp(name: str) -> str:
    """What generated a fixture folder: the generator's version and the fixture's own spec."""
    spec = hashlib.sha256(json.dumps(FIXTURES[name], sort_keys=True).encode()).hexdigest()[:16]
    return f"{FORMAT_TAG}:{spec}"


def generate(name: str, folder: Path) -> Path:
    """Write fixture `name` into `folder` (replacing it) via a temporary folder renamed at the end."""
    spec = FIXTURES[name]
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        })
        _write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        write_tokenizer(tmp / "tokenizer")
        seed = spec["seed"]
        for component, weights_file in (("unet", "diffusion_pytorch_model.safetensors"),
                                        ("vae", "diffusion_pytorch_model.safetensors"),
                                        ("text_encoder", "model.safetensors")):
            config = spec[component]
            _write_json(tmp / component / "config.json", config)
            shapes = _parameter_shapes(component, config)
            _write_weights(tmp / component / weights_file, shapes, seed, component)
        (tmp / ".generated").write_text(_stamp(name))
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _parameter_shapes(component: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes exactly as the reference classes define them (built on the meta device)."""
    import torch

    with torch.device("meta"):
        if component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
            model = CLIPTextModel(CLIPTextConfig(**fields))
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel

            cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if component == "text_encoder":
        # Published SD folders store CLIP under `text_model.`; transformers 5 strips it on load.
        shapes = {f"text_model.{key}": shape for key, shape in shapes.items() if "position_ids" not in key}
    return shapes


def _init_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values at the scale trained weights have, so activations stay O(1) through every layer."""
    leaf = key.rsplit(".", 1)[-1]
    is_norm = any(tag in key for tag in ("norm", "layer_norm"))
    if leaf == "bias":
        values = rng.standard_normal(shape) * 0.05
    elif is_norm and len(shape) == 1:
        values = 1.0 + rng.standard_normal(shape) * 0.1
    elif "embedding" in key and len(shape) == 2 and ("token" in key or "position" in key):
        values = rng.standard_normal(shape) * (0.02 if "token" in key else 0.01)
    else:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        values = rng.standard_normal(shape) / np.sqrt(fan_in)
    return values.astype(np.float32)


def _write_weights(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, component: str) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    for key in sorted(shapes):
        rng = np.random.default_rng([seed, zlib.crc32(f"{component}/{key}".encode())])
        tensors[key] = _init_tensor(key, shapes[key], rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def bpe_merges() -> list[tuple[str, str]]:
    """The 48,894 merges of CLIP's BPE, as the original tokenizer reads them from the vocabulary file."""
    lines = gzip.open(VOCAB_FILE, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte-to-printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer(folder: Path) -> None:
    """vocab.json, merges.txt and configs of a CLIPTokenizer, derived from the BPE vocabulary file."""
    merges = bpe_merges()
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        **special, "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
    })


def load_prompts() -> list[dict]:
    return json.loads(PROMPTS_FILE.read_text())


def noise_path(model_label: str, height: int, width: int, seed: int, batch: int = 1) -> Path:
    suffix = "" if batch == 1 else f"_n{batch}"
    return NOISE_DIR / f"{model_label}_{height}x{width}_seed{seed}{suffix}.npy"


def fixed_noise(model_label: str, height: int, width: int, seed: int, batch: int = 1,
                latent_channels: int = 4, scale: int = 8) -> np.ndarray:
    """x_T for (model, size, seed): read from its .npy file, which is written once if missing.

    The file, not an RNG, is the source of truth, so any implementation in any language starts from
    the same noise. New files are drawn with NumPy's PCG64 standard normal in float64, stored as float32.
    """
    path = noise_path(model_label, height, width, seed, batch)
    shape = (batch, latent_channels, height // scale, width // scale)
    if path.exists():
        noise = np.load(path, allow_pickle=False)
        if noise.shape != shape:
            raise FixtureError(f"{path} holds noise of shape {noise.shape}, expected {shape}; delete it to redraw")
        return noise
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, noise, allow_pickle=False)
    os.replace(tmp, path)
    return noise


HASH_MEMO = FIXTURES_DIR.parent / "build" / "folder-hashes.json"


def folder_hash(folder: Path) -> str:
    """sha256 over every config and weight file of a model folder (names and bytes), for run metadata.

    Hashing a full-size model reads 4 GB, so digests are memoised by (path, size, mtime) of each file.
    """
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = hashlib.sha256(json.dumps(
        [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()
    memo = json.loads(HASH_MEMO.read_text()) if HASH_MEMO.exists() else {}
    if stamp in memo:
        return memo[stamp]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    memo[stamp] = digest.hexdigest()
    HASH_MEMO.parent.mkdir(parents=True, exist_ok=True)
    tmp = HASH_MEMO.with_name(f".{HASH_MEMO.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, HASH_MEMO)
    return memo[stamp]
