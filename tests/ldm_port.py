"""A test double for a foreign port: writes a run the way a port named after the original CompVis/LDM
modules would, from the tensors of a diffusers-named run (our impl's, so the numbers differ from the
reference's as a real port's do).

Its LDM naming is derived here independently of sd_parity's `ldm` map, by following LDM's own
constructors (openaimodel.UNetModel, model.Decoder, transformers' CLIPTextModel under
FrozenCLIPEmbedder): modules are hooked as LDM builds them, sequential containers report after their
last child, identity skip connections report their input, block inputs and functions report nothing.
On top, the port makes three choices a port commonly makes:
  - fused q/k/v: each self-attention computes one `to_qkv` projection (B, T, 3C);
  - channels-last: every 4-D activation is stored (N, H, W, C);
  - a classifier-free-guidance batch ordered [cond, uncond] (the reference's is [uncond, cond]).
The run is written with RUN_WRITER: switching to another run form (a directory of .npy files) is the
one line below.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from sd_parity.runs.hdf5 import RunReader, RunWriter

RUN_WRITER = RunWriter

# LDM ResBlock: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv], skip_connection; diffusers' ResnetBlock2D calls one SiLU thrice.
LDM_RESBLOCK = {"norm1": "in_layers.0", "nonlinearity": "in_layers.1", "conv1": "in_layers.2",
                "nonlinearity#1": "emb_layers.0", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                "nonlinearity#2": "out_layers.1", "dropout": "out_layers.2", "conv2": "out_layers.3",
                "conv_shortcut": "skip_connection"}
# LDM's VAE ResnetBlock calls nonlinearity() as a function; AttnBlock projects with 1x1 convolutions.
LDM_VAE_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "dropout": "dropout", "conv2": "conv2",
                    "conv_shortcut": "nin_shortcut"}
LDM_ATTNBLOCK = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_layout(config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(diffusers module -> LDM module, LDM container -> its last child), as UNetModel.__init__ builds them."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    down_attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    modules, input_blocks, output_blocks = {}, [["conv_in"]], []
    for level in range(levels):
        for layer in range(per_level):
            block = [f"down_blocks.{level}.resnets.{layer}"]
            if down_attention[level]:
                block.append(f"down_blocks.{level}.attentions.{layer}")
            input_blocks.append(block)
        if level != levels - 1:
            input_blocks.append([f"down_blocks.{level}.downsamplers.0"])
    for level in reversed(range(levels)):
        up = levels - 1 - level
        for layer in range(per_level + 1):
            block = [f"up_blocks.{up}.resnets.{layer}"]
            if up_attention[up]:
                block.append(f"up_blocks.{up}.attentions.{layer}")
            if level and layer == per_level:
                block.append(f"up_blocks.{up}.upsamplers.0")
            output_blocks.append(block)
    containers = {}
    for prefix, blocks in (("input_blocks", input_blocks), ("output_blocks", output_blocks),
                           ("middle_block", [["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]])):
        for index, block in enumerate(blocks):
            container = prefix if prefix == "middle_block" else f"{prefix}.{index}"
            for child, module in enumerate(block):
                modules[module] = f"{container}.{child}"
            containers[container] = f"{container}.{len(block) - 1}"
    modules.update({"conv_norm_out": "out.0", "conv_act": "out.1", "conv_out": "out.2", "time_embedding": "time_embed"})
    containers["out"] = "out.2"
    return modules, containers


_BLOCK_OUTPUT = re.compile(r"^(down_blocks|up_blocks)\.\d+(\[.*)?$|^mid_block$")
_UNET_SPECIAL = {"@sample": "@x", "@timestep": "@timesteps", "@encoder_hidden_states": "@context",
                 "time_embedding.linear_1": "time_embed.0", "time_embedding.act": "time_embed.1",
                 "time_embedding.linear_2": "time_embed.2"}
_SEQUENTIAL_LAST = ("in_layers.2", "emb_layers.1", "out_layers.3", "to_out.1", "ff.net.2")


def _rename_unet(name: str, modules: dict[str, str]) -> str | None:
    """The LDM name of a diffusers-named UNet activation (None: LDM has no such tensor)."""
    if name in _UNET_SPECIAL:
        return _UNET_SPECIAL[name]
    if "@" in name or name in ("time_proj", "0") or _BLOCK_OUTPUT.match(name):
        return None  # block inputs, a function, diffusers' block tuples: nothing in LDM reports them
    for module in sorted(modules, key=len, reverse=True):
        if name in (module, module + "[0]"):
            return modules[module]
        if name.startswith(module + "."):
            inner = name[len(module) + 1:]
            if ".resnets." in module:
                inner = LDM_RESBLOCK.get(inner, inner)
            elif ".downsamplers." in module:
                inner = {"conv": "op"}.get(inner, inner)
            return f"{modules[module]}.{inner}"
    return None


def write_ldm_port_run(source: Path, path: Path, unet_config: dict, vae_config: dict) -> Path:
    """The port's run: `source`'s tensors under LDM names, fused, channels-last, CFG [cond, uncond]."""
    modules, containers = ldm_unet_layout(unet_config)
    container_of = {child: container for container, child in containers.items()}
    vae_levels = len(vae_config["block_out_channels"])
    with RunReader(source) as reader, RUN_WRITER(path, {**reader.metadata, "impl": "ldm-port-double"}) as writer:
        def put(component, invocation, name, array):
            if component in ("unet", "vae_decoder") and array.ndim == 4:
                array = array.transpose(0, 2, 3, 1)  # channels-last
            if component == "unet" and array.ndim and array.shape[0] == 2:
                array = np.concatenate([array[1:], array[:1]])  # [cond, uncond]
            writer.write(component, invocation, name, np.ascontiguousarray(array))

        names = {(e.component, e.invocation, e.name) for e in reader.entries()}
        fused: dict[str, list[np.ndarray]] = {}
        hidden = None  # the UNet's running hidden state: an identity skip connection reports it
        for entry in reader.entries():
            component, invocation, name = entry.component, entry.invocation, entry.name
            array = reader.read(entry)
            if component == "pipeline":
                writer.write(component, invocation, name, array)
            elif component == "text_encoder":
                ldm = _rename_text(name)
                if ldm is not None:
                    writer.write(component, invocation, ldm, array)
            elif component == "vae_decoder":
                ldm, layout = _rename_vae(name, vae_levels)
                if ldm is not None:
                    put(component, invocation, ldm, _to_feature_map(array, layout))
            elif (ldm := _rename_unet(name, modules)) is not None:
                parent, _, leaf = ldm.rpartition(".")
                if parent.endswith(".attn1") and leaf in ("to_q", "to_k", "to_v"):
                    fused.setdefault(parent, []).append(array)
                    if leaf == "to_v":
                        put(component, invocation, f"{parent}.to_qkv", np.concatenate(fused.pop(parent), axis=-1))
                    continue
                put(component, invocation, ldm, array)
                if ldm.endswith(_SEQUENTIAL_LAST):
                    put(component, invocation, parent, array)  # in_layers, out_layers, to_out, ff.net ...
                if ldm.endswith(".out_layers.3"):
                    resnet = name.rsplit(".", 1)[0]
                    if (component, invocation, f"{resnet}.conv_shortcut") not in names:
                        put(component, invocation, f"{parent.rsplit('.', 1)[0]}.skip_connection", hidden)
                if ldm in container_of:
                    put(component, invocation, container_of[ldm], array)
                if ldm in container_of or ldm.startswith("middle_block.") and ldm.count(".") == 1:
                    hidden = array
    return path


def _to_feature_map(array: np.ndarray, layout: str | None) -> np.ndarray:
    """LDM's VAE attention works on feature maps (B, C, H, W) where diffusers' holds tokens or (B, C, H*W)."""
    if layout == "tokens":
        side = int(round(array.shape[1] ** 0.5))
        return array.reshape(array.shape[0], side, side, array.shape[2]).transpose(0, 3, 1, 2)
    if layout == "flat":
        side = int(round(array.shape[2] ** 0.5))
        return array.reshape(array.shape[0], array.shape[1], side, side)
    return array


def _rename_text(name: str) -> str | None:
    if "@hidden_states" in name:
        return None
    if name in ("@input_ids",):
        return name
    if name in ("last_hidden_state", "pooler_output"):
        return f"text_model[{name}]"
    if name.startswith("encoder.layers.") and name.count(".") == 2:
        return f"text_model.{name}[0]"  # transformers 4: a layer returns a 1-tuple
    return f"text_model.{name}"


def _rename_vae(name: str, levels: int) -> tuple[str | None, str | None]:
    if "@" in name and name != "@z" or "nonlinearity" in name or name in ("0", "decoder.conv_act") \
            or name.endswith("to_out.1"):
        return None, None
    renames = {"decoder.conv_norm_out": "decoder.norm_out", "decoder.mid_block.resnets.0": "decoder.mid.block_1",
               "decoder.mid_block.resnets.1": "decoder.mid.block_2", "decoder.mid_block.attentions.0": "decoder.mid.attn_1"}
    if name == "decoder.mid_block" or (name.startswith("decoder.up_blocks.") and name.count(".") == 2):
        return None, None  # diffusers' block outputs: LDM never calls a level as one module
    for module, ldm in renames.items():
        if name == module or name.startswith(module + "."):
            inner = name[len(module) + 1:]
            if module.endswith("attentions.0") and inner:
                return f"{ldm}.{LDM_ATTNBLOCK[inner]}", "flat" if inner == "group_norm" else "tokens"
            if inner:
                inner = LDM_VAE_RESBLOCK[inner]
            return (f"{ldm}.{inner}" if inner else ldm), None
    if name.startswith("decoder.up_blocks."):
        _, _, level, kind, rest = name.split(".", 4)
        ldm_level = levels - 1 - int(level)
        if kind == "upsamplers":
            return f"decoder.up.{ldm_level}.upsample" + rest[1:], None  # "0.conv" -> ".conv", "0" -> ""
        index, _, inner = rest.partition(".")
        inner = LDM_VAE_RESBLOCK[inner] if inner else ""
        return f"decoder.up.{ldm_level}.block.{index}" + (f".{inner}" if inner else ""), None
    return name, None


def model_configs(model_dir: Path) -> tuple[dict, dict]:
    return (json.loads((model_dir / "unet" / "config.json").read_text()),
            json.loads((model_dir / "vae" / "config.json").read_text()))
