"""Tensor names and shapes of SD 1.x components in diffusers layout and in the original CompVis (LDM) layout.

An original single-file checkpoint holds all three components under fixed prefixes. Inside each,
the two layouts differ by block numbering (derived here from the architecture config) and by
sub-module names (the rename tables below). `key_map(component, config)` expands both into one row
per tensor: diffusers name -> (LDM name, shape). Shapes come from the same walk over the
architecture, so a checkpoint can be checked against a config before any tensor is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
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

# diffusers sub-module -> LDM sub-module; names not listed are the same in both layouts
# (the UNet's attention blocks, the VAE's convolutions, all of CLIP).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TIME_EMBEDDING = {"linear_1": "0", "linear_2": "2"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# LDM's VAE attention projects with 1x1 convolutions where diffusers has linear layers:
# same numbers, weight shape (out, in, 1, 1) instead of (out, in).
VAE_CONV1X1 = {"to_q", "to_k", "to_v", "to_out.0"}

Shapes = dict[str, tuple[int, ...]]  # tensor name inside a module -> shape


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


def _spatial_transformer(channels: int, context: int) -> Shapes:
    """SD 1.x: one transformer block between 1x1-conv projections, GEGLU feed-forward of 4x width."""
    block = {**_sub("norm1", _norm(channels)), **_sub("attn1", _attention(channels, channels, bias=False)),
             **_sub("norm2", _norm(channels)), **_sub("attn2", _attention(channels, context, bias=False)),
             **_sub("norm3", _norm(channels)), **_sub("ff.net.0.proj", _linear(8 * channels, channels)),
             **_sub("ff.net.2", _linear(channels, 4 * channels))}
    return {**_sub("norm", _norm(channels)), **_sub("proj_in", _conv(channels, channels, 1)),
            **_sub("transformer_blocks.0", block), **_sub("proj_out", _conv(channels, channels, 1))}


Module = tuple[str, str, Shapes, dict[str, str]]  # diffusers path, LDM path, tensors, sub-module renames


def _has_attention(block_types: list[str], which: str, levels: int) -> list[bool]:
    if len(block_types) != levels:
        raise ModelInputError(f"unet config: {which} lists {len(block_types)} blocks for {levels} block_out_channels")
    return [kind.startswith("CrossAttn") for kind in block_types]


def _unet_modules(config: dict) -> Iterator[Module]:
    if config.get("use_linear_projection"):
        raise ModelInputError("unet config has use_linear_projection (SD 2.x): its linear proj_in/proj_out, and "
                              "SD 2.x's OpenCLIP text encoder, are not in this key map yet; only SD 1.x converts")
    channels, per_level = list(config["block_out_channels"]), config["layers_per_block"]
    levels, temb, context = len(channels), 4 * config["block_out_channels"][0], config["cross_attention_dim"]
    down_attention = _has_attention(config["down_block_types"], "down_block_types", levels)
    up_attention = _has_attention(config["up_block_types"], "up_block_types", levels)
    heads = config.get("attention_head_dim", 8)
    heads = heads if isinstance(heads, list) else [heads] * levels
    uneven = [c for c, h in zip(channels, heads) if c % h]
    if uneven:
        raise ModelInputError(f"unet config: block_out_channels {channels} not divisible by attention heads {heads}")

    yield "conv_in", "input_blocks.0.0", _conv(channels[0], config["in_channels"], 3), {}
    yield "time_embedding", "time_embed", {**_sub("linear_1", _linear(temb, channels[0])),
                                           **_sub("linear_2", _linear(temb, temb))}, UNET_TIME_EMBEDDING
    # LDM numbers the down path as one flat list (input_blocks) and the up path likewise (output_blocks);
    # each up resnet also takes the output of one down-path layer (the skip), last in, first out.
    skips, current = [channels[0]], channels[0]
    for level, out in enumerate(channels):
        for layer in range(per_level):
            index = 1 + level * (per_level + 1) + layer
            yield (f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0",
                   _resnet(current, out, temb), UNET_RESNET)
            if down_attention[level]:
                yield (f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1",
                       _spatial_transformer(out, context), {})
            current = out
            skips.append(out)
        if level < levels - 1:
            index = (level + 1) * (per_level + 1)
            yield f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op", _conv(out, out, 3), {}
            skips.append(out)
    yield "mid_block.resnets.0", "middle_block.0", _resnet(current, current, temb), UNET_RESNET
    yield "mid_block.attentions.0", "middle_block.1", _spatial_transformer(current, context), {}
    yield "mid_block.resnets.1", "middle_block.2", _resnet(current, current, temb), UNET_RESNET
    for level, out in enumerate(reversed(channels)):
        for layer in range(per_level + 1):
            index = level * (per_level + 1) + layer
            yield (f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0",
                   _resnet(current + skips.pop(), out, temb), UNET_RESNET)
            if up_attention[level]:
                yield (f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1",
                       _spatial_transformer(out, context), {})
            current = out
        if level < levels - 1:
            slot = 2 if up_attention[level] else 1
            yield f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv", _conv(out, out, 3), {}
    yield "conv_norm_out", "out.0", _norm(channels[0]), {}
    yield "conv_out", "out.2", _conv(config["out_channels"], channels[0], 3), {}


def _vae_mid(side: str, channels: int) -> Iterator[Module]:
    yield f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _resnet(channels, channels), VAE_RESNET
    attention = {**_sub("group_norm", _norm(channels)), **_attention(channels, channels, bias=True)}
    yield f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", attention, VAE_ATTENTION
    yield f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _resnet(channels, channels), VAE_RESNET


def _vae_modules(config: dict) -> Iterator[Module]:
    channels, per_level = list(config["block_out_channels"]), config["layers_per_block"]
    latent, levels = config["latent_channels"], len(channels)
    yield "encoder.conv_in", "encoder.conv_in", _conv(channels[0], config["in_channels"], 3), {}
    current = channels[0]
    for level, out in enumerate(channels):
        for layer in range(per_level):
            yield (f"encoder.down_blocks.{level}.resnets.{layer}", f"encoder.down.{level}.block.{layer}",
                   _resnet(current, out), VAE_RESNET)
            current = out
        if level < levels - 1:
            yield (f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv",
                   _conv(out, out, 3), {})
    yield from _vae_mid("encoder", current)
    yield "encoder.conv_norm_out", "encoder.norm_out", _norm(current), {}
    yield "encoder.conv_out", "encoder.conv_out", _conv(2 * latent, current, 3), {}
    yield "quant_conv", "quant_conv", _conv(2 * latent, 2 * latent, 1), {}
    yield "post_quant_conv", "post_quant_conv", _conv(latent, latent, 1), {}
    yield "decoder.conv_in", "decoder.conv_in", _conv(current, latent, 3), {}
    yield from _vae_mid("decoder", current)
    # diffusers counts decoder levels from the bottom (up_blocks.0 is the lowest resolution), LDM from the top.
    for level, out in enumerate(reversed(channels)):
        ldm_level = levels - 1 - level
        for layer in range(per_level + 1):
            yield (f"decoder.up_blocks.{level}.resnets.{layer}", f"decoder.up.{ldm_level}.block.{layer}",
                   _resnet(current, out), VAE_RESNET)
            current = out
        if level < levels - 1:
            yield (f"decoder.up_blocks.{level}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv",
                   _conv(out, out, 3), {})
    yield "decoder.conv_norm_out", "decoder.norm_out", _norm(current), {}
    yield "decoder.conv_out", "decoder.conv_out", _conv(config["out_channels"], current, 3), {}


def _text_encoder_modules(config: dict) -> Iterator[Module]:
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    embeddings = {"token_embedding.weight": (config["vocab_size"], hidden),
                  "position_embedding.weight": (config["max_position_embeddings"], hidden)}
    yield "text_model.embeddings", "text_model.embeddings", embeddings, {}
    layer = {**_sub("self_attn.q_proj", _linear(hidden, hidden)), **_sub("self_attn.k_proj", _linear(hidden, hidden)),
             **_sub("self_attn.v_proj", _linear(hidden, hidden)), **_sub("self_attn.out_proj", _linear(hidden, hidden)),
             **_sub("layer_norm1", _norm(hidden)), **_sub("mlp.fc1", _linear(inner, hidden)),
             **_sub("mlp.fc2", _linear(hidden, inner)), **_sub("layer_norm2", _norm(hidden))}
    for index in range(config["num_hidden_layers"]):
        yield f"text_model.encoder.layers.{index}", f"text_model.encoder.layers.{index}", layer, {}
    yield "text_model.final_layer_norm", "text_model.final_layer_norm", _norm(hidden), {}


_MODULES = {"unet": _unet_modules, "vae": _vae_modules, "text_encoder": _text_encoder_modules}


def key_map(component: str, config: dict) -> dict[str, KeyRule]:
    """diffusers tensor name -> its LDM name (with the single-file prefix) and shape, in model order."""
    if component not in _MODULES:
        raise ModelInputError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    try:
        modules = list(_MODULES[component](config))
    except KeyError as err:
        raise ModelInputError(f"{component} config lacks field {err.args[0]!r}") from err
    rules = {}
    for diffusers_path, ldm_path, shapes, renames in modules:
        for leaf, shape in shapes.items():
            submodule, tensor = leaf.rsplit(".", 1) if "." in leaf else ("", leaf)
            ldm_leaf = f"{renames.get(submodule, submodule)}.{tensor}" if submodule else tensor
            conv1x1 = component == "vae" and submodule in VAE_CONV1X1 and tensor == "weight"
            ldm_key = f"{LDM_PREFIX[component]}{ldm_path}.{ldm_leaf}"
            rules[f"{diffusers_path}.{leaf}"] = KeyRule(ldm_key, shape, conv1x1)
    return rules
