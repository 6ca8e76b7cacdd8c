"""The modules of SD 1.x components in diffusers layout and in the original CompVis (LDM) layout.

One walk over the architecture config (`modules(component, config)`) lists every module in both
layouts, in execution order: its diffusers path, its LDM path, what kind of module it is and the
shapes of its parameters. The two layouts differ by block numbering (derived in the walk from the
config) and by sub-module names (SUBMODULES, per kind). Two maps are derived from this one walk:
  - `key_map(component, config)`: weight names, diffusers name -> (LDM name, shape), used to read and
    write single-file checkpoints (impl/checkpoint.py);
  - the harness's `--map ldm`, which names a port's activations (sd_parity.judging.maps.ldm).
Shapes come from the same walk, so a checkpoint can be checked against a config before any tensor is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

from .errors import ModelInputError

COMPONENTS = ("unet", "vae", "text_encoder")
LDM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    # diffusers names already start with "text_model."
    "text_encoder": "cond_stage_model.transformer.",
}
# CLIP's position_ids buffer (arange(77)), which original SD 1.x single files carry and some of their
# loaders expect; written into single files, ignored on reading.
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
# Tensors that single files or folders carry but no model weight comes from: LDM's noise-schedule
# buffers, EMA copies of the UNet, and CLIP's position_ids buffer (always arange(77)).
IGNORED_KEYS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar)$"
    r"|^model_ema\.|(^|\.)position_ids$"
)

# diffusers sub-module -> LDM sub-module, weightless ones (activations, dropout) included; names not
# listed are the same in both layouts (the UNet's attention blocks, the VAE's convolutions, all of
# CLIP). None: LDM has no module there (it calls a function). A `#k` suffix is the k-th call of a
# module that diffusers calls more than once and LDM splits into separate modules.
UNET_RESNET = {"norm1": "in_layers.0", "nonlinearity": "in_layers.1", "conv1": "in_layers.2",
               "nonlinearity#1": "emb_layers.0", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "nonlinearity#2": "out_layers.1", "dropout": "out_layers.2",
               "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TIME_EMBEDDING = {"linear_1": "0", "act": "1", "linear_2": "2"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut", "nonlinearity": None, "nonlinearity#1": None}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "to_out.1": None}
# LDM's VAE attention projects with 1x1 convolutions where diffusers has linear layers:
# same numbers, weight shape (out, in, 1, 1) instead of (out, in), outputs (B, C, H, W) instead of (B, H*W, C).
VAE_CONV1X1 = {"to_q", "to_k", "to_v", "to_out.0"}
# LDM's Downsample names its convolution `op`.
UNET_DOWNSAMPLE = {"conv": "op"}

# Module kind -> its sub-module renames. Kinds not listed have the same insides in both layouts.
SUBMODULES: dict[str, dict[str, str | None]] = {
    "unet_resnet": UNET_RESNET, "time_embedding": UNET_TIME_EMBEDDING, "unet_downsample": UNET_DOWNSAMPLE,
    "vae_resnet": VAE_RESNET, "vae_attention": VAE_ATTENTION,
}

Shapes = dict[str, tuple[int, ...]]  # tensor name inside a module -> shape


@dataclass(frozen=True)
class Module:
    """One module in both layouts. `ldm` is None where LDM computes the same thing in a plain function."""

    diffusers: str  # module path in the diffusers model, e.g. "down_blocks.1.resnets.0"
    ldm: str | None  # module path in the LDM model (without the single-file prefix), e.g. "input_blocks.4.0"
    # "unet_resnet", "vae_resnet", "transformer" (a spatial transformer), "vae_attention", "time_embedding",
    # "unet_downsample", "downsample", "upsample", "clip_layer", "embeddings", "conv", "norm", "linear",
    # "activation" (weightless)
    kind: str
    shapes: Shapes = field(default_factory=dict)

    @property
    def renames(self) -> dict[str, str | None]:
        return SUBMODULES.get(self.kind, {})


@dataclass(frozen=True)
class KeyRule:
    ldm: str
    shape: tuple[int, ...]  # in diffusers layout
    conv1x1: bool = False

    @property
    def ldm_shape(self) -> tuple[int, ...]:
        return self.shape + (1, 1) if self.conv1x1 else self.shape


def _sub(name: str, shapes: Shapes) -> Shapes:
    return {f"{name}.{leaf}": shape for leaf, shape in shapes.items()}


def _norm(channels: int) -> Shapes:
    return {"weight": (channels,), "bias": (channels,)}


def _conv(out: int, inp: int, kernel: int) -> Shapes:
    return {"weight": (out, inp, kernel, kernel), "bias": (out,)}


def _linear(out: int, inp: int, bias: bool = True) -> Shapes:
    return {"weight": (out, inp), "bias": (out,)} if bias else {"weight": (out, inp)}


def _resnet(inp: int, out: int, temb: int | None = None) -> Shapes:
    shapes = {**_sub("norm1", _norm(inp)), **_sub("conv1", _conv(out, inp, 3))}
    if temb:
        shapes.update(_sub("time_emb_proj", _linear(out, temb)))
    shapes.update({**_sub("norm2", _norm(out)), **_sub("conv2", _conv(out, out, 3))})
    if inp != out:
        shapes.update(_sub("conv_shortcut", _conv(out, inp, 1)))
    return shapes


def _attention(dim: int, context: int, bias: bool) -> Shapes:
    return {**_sub("to_q", _linear(dim, dim, bias)), **_sub("to_k", _linear(dim, context, bias)),
            **_sub("to_v", _linear(dim, context, bias)), **_sub("to_out.0", _linear(dim, dim))}


def _spatial_transformer(channels: int, context: int, linear: bool) -> Shapes:
    """One transformer block between projections (1x1 convolutions in SD 1.x, linear layers in SD 2.x),
    GEGLU feed-forward of 4x width."""
    projection = _linear(channels, channels) if linear else _conv(channels, channels, 1)
    block = {**_sub("norm1", _norm(channels)), **_sub("attn1", _attention(channels, channels, bias=False)),
             **_sub("norm2", _norm(channels)), **_sub("attn2", _attention(channels, context, bias=False)),
             **_sub("norm3", _norm(channels)), **_sub("ff.net.0.proj", _linear(8 * channels, channels)),
             **_sub("ff.net.2", _linear(channels, 4 * channels))}
    return {**_sub("norm", _norm(channels)), **_sub("proj_in", projection),
            **_sub("transformer_blocks.0", block), **_sub("proj_out", projection)}


def _has_attention(block_types: list[str], which: str, levels: int) -> list[bool]:
    if len(block_types) != levels:
        raise ModelInputError(f"unet config: {which} lists {len(block_types)} blocks for {levels} block_out_channels")
    return [kind.startswith("CrossAttn") for kind in block_types]


def _unet_modules(config: dict) -> Iterator[Module]:
    linear = bool(config.get("use_linear_projection"))
    channels, per_level = list(config["block_out_channels"]), config["layers_per_block"]
    levels, temb, context = len(channels), 4 * config["block_out_channels"][0], config["cross_attention_dim"]
    down_attention = _has_attention(config["down_block_types"], "down_block_types", levels)
    up_attention = _has_attention(config["up_block_types"], "up_block_types", levels)
    heads = config.get("attention_head_dim", 8)
    heads = heads if isinstance(heads, list) else [heads] * levels
    uneven = [c for c, h in zip(channels, heads) if c % h]
    if uneven:
        raise ModelInputError(f"unet config: block_out_channels {channels} not divisible by attention heads {heads}")

    yield Module("conv_in", "input_blocks.0.0", "conv", _conv(channels[0], config["in_channels"], 3))
    yield Module("time_proj", None, "activation")  # LDM's timestep_embedding() is a function
    yield Module("time_embedding", "time_embed", "time_embedding",
                 {**_sub("linear_1", _linear(temb, channels[0])), **_sub("linear_2", _linear(temb, temb))})
    # LDM numbers the down path as one flat list (input_blocks) and the up path likewise (output_blocks);
    # each up resnet also takes the output of one down-path layer (the skip), last in, first out.
    skips, current = [channels[0]], channels[0]
    for level, out in enumerate(channels):
        for layer in range(per_level):
            index = 1 + level * (per_level + 1) + layer
            yield Module(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", "unet_resnet",
                         _resnet(current, out, temb))
            if down_attention[level]:
                yield Module(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1", "transformer",
                             _spatial_transformer(out, context, linear))
            current = out
            skips.append(out)
        if level < levels - 1:
            index = (level + 1) * (per_level + 1)
            yield Module(f"down_blocks.{level}.downsamplers.0", f"input_blocks.{index}.0", "unet_downsample",
                         _sub("conv", _conv(out, out, 3)))
            skips.append(out)
    yield Module("mid_block.resnets.0", "middle_block.0", "unet_resnet", _resnet(current, current, temb))
    yield Module("mid_block.attentions.0", "middle_block.1", "transformer", _spatial_transformer(current, context, linear))
    yield Module("mid_block.resnets.1", "middle_block.2", "unet_resnet", _resnet(current, current, temb))
    for level, out in enumerate(reversed(channels)):
        for layer in range(per_level + 1):
            index = level * (per_level + 1) + layer
            yield Module(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", "unet_resnet",
                         _resnet(current + skips.pop(), out, temb))
            if up_attention[level]:
                yield Module(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1", "transformer",
                             _spatial_transformer(out, context, linear))
            current = out
        if level < levels - 1:
            slot = 2 if up_attention[level] else 1
            yield Module(f"up_blocks.{level}.upsamplers.0", f"output_blocks.{index}.{slot}", "upsample",
                         _sub("conv", _conv(out, out, 3)))
    yield Module("conv_norm_out", "out.0", "norm", _norm(channels[0]))
    yield Module("conv_act", "out.1", "activation")
    yield Module("conv_out", "out.2", "conv", _conv(config["out_channels"], channels[0], 3))


def _vae_mid(side: str, channels: int) -> Iterator[Module]:
    yield Module(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", "vae_resnet", _resnet(channels, channels))
    attention = {**_sub("group_norm", _norm(channels)), **_attention(channels, channels, bias=True)}
    yield Module(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", "vae_attention", attention)
    yield Module(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", "vae_resnet", _resnet(channels, channels))


def _vae_modules(config: dict) -> Iterator[Module]:
    channels, per_level = list(config["block_out_channels"]), config["layers_per_block"]
    latent, levels = config["latent_channels"], len(channels)
    yield Module("encoder.conv_in", "encoder.conv_in", "conv", _conv(channels[0], config["in_channels"], 3))
    current = channels[0]
    for level, out in enumerate(channels):
        for layer in range(per_level):
            yield Module(f"encoder.down_blocks.{level}.resnets.{layer}", f"encoder.down.{level}.block.{layer}",
                         "vae_resnet", _resnet(current, out))
            current = out
        if level < levels - 1:
            yield Module(f"encoder.down_blocks.{level}.downsamplers.0", f"encoder.down.{level}.downsample",
                         "downsample", _sub("conv", _conv(out, out, 3)))
    yield from _vae_mid("encoder", current)
    yield Module("encoder.conv_norm_out", "encoder.norm_out", "norm", _norm(current))
    yield Module("encoder.conv_act", None, "activation")  # LDM's nonlinearity() is a function
    yield Module("encoder.conv_out", "encoder.conv_out", "conv", _conv(2 * latent, current, 3))
    yield Module("quant_conv", "quant_conv", "conv", _conv(2 * latent, 2 * latent, 1))
    yield Module("post_quant_conv", "post_quant_conv", "conv", _conv(latent, latent, 1))
    yield Module("decoder.conv_in", "decoder.conv_in", "conv", _conv(current, latent, 3))
    yield from _vae_mid("decoder", current)
    # diffusers counts decoder levels from the bottom (up_blocks.0 is the lowest resolution), LDM from the top.
    for level, out in enumerate(reversed(channels)):
        ldm_level = levels - 1 - level
        for layer in range(per_level + 1):
            yield Module(f"decoder.up_blocks.{level}.resnets.{layer}", f"decoder.up.{ldm_level}.block.{layer}",
                         "vae_resnet", _resnet(current, out))
            current = out
        if level < levels - 1:
            yield Module(f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.up.{ldm_level}.upsample",
                         "upsample", _sub("conv", _conv(out, out, 3)))
    yield Module("decoder.conv_norm_out", "decoder.norm_out", "norm", _norm(current))
    yield Module("decoder.conv_act", None, "activation")
    yield Module("decoder.conv_out", "decoder.conv_out", "conv", _conv(config["out_channels"], current, 3))


def _text_encoder_modules(config: dict) -> Iterator[Module]:
    if config.get("hidden_act") == "gelu":
        raise ModelInputError("text_encoder config has hidden_act gelu: an OpenCLIP text encoder (SD 2.x), whose "
                              "original layout (cond_stage_model.model.transformer.resblocks, fused in_proj) "
                              "is not in this key map yet; only SD 1.x's CLIP text encoder converts")
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    embeddings = {"token_embedding.weight": (config["vocab_size"], hidden),
                  "position_embedding.weight": (config["max_position_embeddings"], hidden)}
    yield Module("text_model.embeddings", "text_model.embeddings", "embeddings", embeddings)
    layer = {**_sub("self_attn.q_proj", _linear(hidden, hidden)), **_sub("self_attn.k_proj", _linear(hidden, hidden)),
             **_sub("self_attn.v_proj", _linear(hidden, hidden)), **_sub("self_attn.out_proj", _linear(hidden, hidden)),
             **_sub("layer_norm1", _norm(hidden)), **_sub("mlp.fc1", _linear(inner, hidden)),
             **_sub("mlp.fc2", _linear(hidden, inner)), **_sub("layer_norm2", _norm(hidden))}
    for index in range(config["num_hidden_layers"]):
        yield Module(f"text_model.encoder.layers.{index}", f"text_model.encoder.layers.{index}", "clip_layer", layer)
    yield Module("text_model.final_layer_norm", "text_model.final_layer_norm", "norm", _norm(hidden))


_MODULES = {"unet": _unet_modules, "vae": _vae_modules, "text_encoder": _text_encoder_modules}


def modules(component: str, config: dict) -> list[Module]:
    """Every module of `component` in both layouts, in execution order (the VAE: encoder, then decoder)."""
    if component not in _MODULES:
        raise ModelInputError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    try:
        return list(_MODULES[component](config))
    except KeyError as err:
        raise ModelInputError(f"{component} config lacks field {err.args[0]!r}") from err


def key_map(component: str, config: dict) -> dict[str, KeyRule]:
    """diffusers tensor name -> its LDM name (with the single-file prefix) and shape, in model order."""
    rules = {}
    for module in modules(component, config):
        for leaf, shape in module.shapes.items():
            submodule, tensor = leaf.rsplit(".", 1) if "." in leaf else ("", leaf)
            ldm_submodule = module.renames.get(submodule, submodule)
            ldm_leaf = f"{ldm_submodule}.{tensor}" if submodule else tensor
            conv1x1 = module.kind == "vae_attention" and submodule in VAE_CONV1X1 and tensor == "weight"
            ldm_key = f"{LDM_PREFIX[component]}{module.ldm}.{ldm_leaf}"
            rules[f"{module.diffusers}.{leaf}"] = KeyRule(ldm_key, shape, conv1x1)
    return rules
