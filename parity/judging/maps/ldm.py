"""`--map ldm`: activations named by the original CompVis/LDM modules, onto the reference's diffusers names.

Generated from impl/ldm_keys.py's walk over the model's config, the same walk the checkpoint key
map comes from, so the two cannot disagree. docs/maps.md states the correspondence rules:
  - a module is named by its LDM path relative to its component (`input_blocks.4.1`, `decoder.up.3.block.0`,
    `text_model.encoder.layers.2`), with or without the single-file prefix (`model.diffusion_model.` ...);
  - sub-modules follow ldm_keys.SUBMODULES (`in_layers.2` is `conv1`), the rest keep their names;
  - LDM's sequential containers (`input_blocks.N`, `output_blocks.N`, `middle_block`, `out`, `in_layers`...)
    output their last child's tensor; they stand for the diffusers block outputs with those values;
  - the block inputs the reference records (`down_blocks.1@hidden_states`, `up_blocks.0@res_hidden_states_tuple[2]`,
    `mid_block@temb`...) are the outputs of earlier modules, so the candidate tensor holding those values
    stands for them (an alias) wherever no candidate tensor is mapped there directly;
  - reference tensors LDM computes in plain functions (`time_proj`, the VAE's `nonlinearity`) have no
    counterpart and are listed as such, not as missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sd_parity.impl.ldm_keys import LDM_PREFIX, VAE_CONV1X1, Module, modules
from sd_parity.runs.naming import block_of
from ..name_map import Target
from ..transforms import Transform
from . import Table

# LDM's UNetModel.forward(x, timesteps, context) against diffusers' (sample, timestep, encoder_hidden_states).
UNET_INPUTS = {"@x": "@sample", "@timesteps": "@timestep", "@context": "@encoder_hidden_states"}
# diffusers' Transformer2DModel returns a 1-tuple; LDM's SpatialTransformer a tensor.
TUPLE_OUTPUT = {"transformer": "[0]"}
# LDM's VAE attention computes with 1x1 convolutions on feature maps; diffusers' on tokens (B, H*W, C),
# and it group-normalises a (B, C, H*W) view.
VAE_ATTENTION_LAYOUT = {**{sub: "tokens" for sub in VAE_CONV1X1}, "group_norm": "reshape"}
# The VAE's inputs and outputs as the reference records them (its decode(z) and encode(x)), as LDM names them too.
VAE_IO = {"vae_decoder": ("@z",), "vae_encoder": ("@x", "mean", "logvar")}
NO_MODULE = "LDM computes this in a function, not a module, so a port named after LDM has no such tensor"


class _Classes:
    """Reference names that hold the same values: diffusers hands one tensor on under several names."""

    def __init__(self):
        self.parent: dict[str, str] = {}
        self.order: dict[str, int] = {}

    def find(self, name: str) -> str:
        self.order.setdefault(name, len(self.order))
        root = self.parent.setdefault(name, name)
        if root != name:
            root = self.parent[name] = self.find(root)
        return root

    def same(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def members(self, name: str) -> list[str]:
        root = self.find(name)
        return sorted((n for n in self.parent if self.find(n) == root), key=self.order.__getitem__)


@dataclass
class _Component:
    """One component's part of the table, built from its modules."""

    name: str
    named: dict[str, tuple[str | None, str, Transform | None]] = field(default_factory=dict)  # ldm -> (to, anchor)
    dropped: dict[str, str] = field(default_factory=dict)
    prefixes: dict[str, str] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    classes: _Classes = field(default_factory=_Classes)

    def is_(self, ldm: str, ref: str, transform: Transform | None = None) -> None:
        """Candidate tensor `ldm` is reference tensor `ref` (and stands for every name with its values)."""
        self.named[ldm] = (ref, ref, transform)
        self.classes.find(ref)

    def stands_for(self, ldm: str, ref: str) -> None:
        """Candidate tensor `ldm` holds `ref`'s values but is not `ref` (an LDM container, a second name)."""
        self.named.setdefault(ldm, (None, ref, None))
        self.classes.find(ref)

    def module(self, module: Module) -> None:
        """A module, its insides (renamed or not) and what it has no counterpart for."""
        if module.ldm is None:
            self.absent[module.diffusers] = NO_MODULE
            return
        self.is_(module.ldm, output(module))
        self.prefixes[module.ldm] = module.diffusers
        last_in: dict[str, tuple[int, str]] = {}  # LDM nn.Sequential inside the module -> (index, ref) of its last child
        for sub, ldm_sub in module.renames.items():
            ref = f"{module.diffusers}.{sub}"
            if ldm_sub is None:
                self.absent[ref] = NO_MODULE
                continue
            layout = VAE_ATTENTION_LAYOUT.get(sub) if module.kind == "vae_attention" else None
            self.is_(f"{module.ldm}.{ldm_sub}", ref, Transform(layout=layout) if layout else None)
            parent, _, index = ldm_sub.rpartition(".")
            if parent and index.isdigit() and int(index) > last_in.get(parent, (-1, ""))[0]:
                last_in[parent] = (int(index), ref)
        for parent, (_, last) in last_in.items():  # in_layers, emb_layers, out_layers
            self.stands_for(f"{module.ldm}.{parent}", last)

    def table_entries(self) -> dict[str, Target]:
        entries = {}
        for ldm, (to, anchor, transform) in self.named.items():
            also = tuple(name for name in self.classes.members(anchor) if name != to)
            entries[ldm] = Target(to, also, transform=transform)
        for ldm, reason in self.dropped.items():
            entries[ldm] = Target(None, drop=reason)
        return entries


def output(module: Module) -> str:
    return module.diffusers + TUPLE_OUTPUT.get(module.kind, "")


def ldm_table(configs: dict[str, dict]) -> Table:
    parts = [_unet(modules("unet", configs["unet"])), *_vae(modules("vae", configs["vae"])),
             _text_encoder(modules("text_encoder", configs["text_encoder"]))]
    table = Table("ldm")
    for part in parts:
        table.exact.update({(part.name, name): target for name, target in part.table_entries().items()})
        table.prefixes[part.name] = part.prefixes
        table.absent.update({(part.name, name): reason for name, reason in part.absent.items()})
    table.strip = {"unet": LDM_PREFIX["unet"], "vae_decoder": LDM_PREFIX["vae"], "vae_encoder": LDM_PREFIX["vae"],
                   "text_encoder": LDM_PREFIX["text_encoder"]}
    return table


def _blocks(component: str, mods: list[Module]) -> dict[str, list[Module]]:
    """The modules of each block (the units the reference names inputs for), in execution order."""
    blocks: dict[str, list[Module]] = {}
    for module in mods:
        block = block_of(component, module.diffusers)
        if block is not None:
            blocks.setdefault(block.path, []).append(module)
    return blocks


def _layer_outputs(path: str, mods: list[Module]) -> list[str]:
    """A block's per-layer outputs (a layer's attention, else its resnet), then its sampler's."""
    layers: dict[int, str] = {}
    sampler = []
    for module in mods:
        kind, _, rest = module.diffusers[len(path) + 1:].partition(".")
        if kind in ("resnets", "attentions"):
            layers[int(rest.split(".")[0])] = output(module)
        else:
            sampler.append(output(module))
    return [layers[i] for i in sorted(layers)] + sampler


def _unet(mods: list[Module]) -> _Component:
    part = _Component("unet")
    for module in mods:
        part.module(module)
        if module.kind == "unet_resnet" and "conv_shortcut.weight" not in module.shapes:
            part.dropped[f"{module.ldm}.skip_connection"] = ("nn.Identity in LDM (the resnet's own input); "
                                                             "diffusers has no module there")
        if module.kind in ("unet_downsample", "upsample"):
            part.classes.same(module.diffusers, f"{module.diffusers}.conv")
        if module.kind == "transformer":
            _transformer_insides(part, module)
    for ldm, ref in UNET_INPUTS.items():
        part.is_(ldm, ref)
    classes = part.classes
    classes.same("time_embedding", "time_embedding.linear_2")
    classes.same("conv_out", "0")
    # diffusers' forward: conv_in starts the residual list; each down block appends its layers' outputs
    # (and its downsampler's); each up block takes as many from the end as it has resnets.
    natural: dict[str, str] = {"conv_out": "0"}
    previous, residuals = "conv_in", ["conv_in"]
    for path, block in _blocks("unet", mods).items():
        classes.same(previous, f"{path}@hidden_states")
        classes.same("time_embedding", f"{path}@temb")
        classes.same("@encoder_hidden_states", f"{path}@encoder_hidden_states")
        outputs = _layer_outputs(path, block)
        if path.startswith("down_blocks."):
            for index, name in enumerate(outputs):
                classes.same(name, f"{path}[1][{index}]")
                natural[name] = f"{path}[1][{index}]"
            residuals += outputs
            previous = f"{path}[0]"
        else:
            if path.startswith("up_blocks."):
                taken = sum(1 for m in block if ".resnets." in m.diffusers)
                for index, name in enumerate(residuals[-taken:]):
                    classes.same(name, f"{path}@res_hidden_states_tuple[{index}]")
                residuals = residuals[:-taken]
            natural[outputs[-1]] = previous = path
        classes.same(outputs[-1], previous)
    # LDM wraps each input block, output block, the middle block and the output head in a sequential
    # container, whose output is its last child's.
    last_child: dict[str, Module] = {}
    for module in mods:
        if module.ldm and module.ldm.split(".")[0] in ("input_blocks", "output_blocks", "middle_block", "out"):
            last_child[module.ldm.rpartition(".")[0]] = module
    for container, child in last_child.items():
        anchor = output(child)
        if anchor in natural:
            part.is_(container, natural[anchor])
        else:
            part.stands_for(container, anchor)
    return part


def _transformer_insides(part: _Component, module: Module) -> None:
    """Inside a spatial transformer the names agree, but LDM calls its attention's `to_out` and its
    feed-forward's `net` as nn.Sequential (outputs: their last child's), where diffusers iterates
    ModuleLists; and at inference dropout returns its input."""
    for block in sorted({leaf.split(".")[1] for leaf in module.shapes if leaf.startswith("transformer_blocks.")}):
        ref = f"{module.diffusers}.transformer_blocks.{block}"
        ldm = f"{module.ldm}.transformer_blocks.{block}"
        for attention in ("attn1", "attn2"):
            part.classes.same(f"{ref}.{attention}", f"{ref}.{attention}.to_out.1")
            part.classes.same(f"{ref}.{attention}.to_out.0", f"{ref}.{attention}.to_out.1")
            part.stands_for(f"{ldm}.{attention}.to_out", f"{ref}.{attention}")
        part.classes.same(f"{ref}.ff", f"{ref}.ff.net.2")
        part.classes.same(f"{ref}.ff.net.0", f"{ref}.ff.net.1")
        part.stands_for(f"{ldm}.ff.net", f"{ref}.ff")


def _vae(mods: list[Module]) -> list[_Component]:
    parts = []
    for component, side, extra, head in (("vae_decoder", "decoder", "post_quant_conv", "decoder.conv_in"),
                                         ("vae_encoder", "encoder", "quant_conv", "encoder.conv_in")):
        part = _Component(component)
        mine = [m for m in mods if m.diffusers.startswith(f"{side}.") or m.diffusers == extra]
        for module in mine:
            part.module(module)
            if module.kind in ("downsample", "upsample"):
                part.classes.same(module.diffusers, f"{module.diffusers}.conv")
            if module.kind == "vae_resnet":  # at inference dropout returns its input
                part.classes.same(f"{module.diffusers}.dropout", f"{module.diffusers}.nonlinearity#1")
        previous = head
        for path, block in _blocks(component, mine).items():
            part.classes.same(previous, f"{path}@hidden_states")
            part.classes.same(_layer_outputs(path, block)[-1], path)
            previous = path
        part.is_(side, side)
        part.classes.same(f"{side}.conv_out", side)
        for name in VAE_IO[component]:
            part.is_(name, name)
        if side == "decoder":
            part.classes.same("decoder", "0")
        parts.append(part)
    return parts


def _text_encoder(mods: list[Module]) -> _Component:
    """transformers' CLIPTextModel inside LDM's FrozenCLIPEmbedder: the same modules under `text_model.`,
    which the reference's transformers 5 names drop; transformers 4 returns a layer's output as a 1-tuple
    and the text model's as a dict."""
    part = _Component("text_encoder")
    part.prefixes["text_model"] = ""
    previous = None
    for module in mods:
        ref = module.diffusers.removeprefix("text_model.")
        part.is_(module.ldm, ref)
        if module.kind == "clip_layer":
            part.stands_for(f"{module.ldm}[0]", ref)
            part.classes.same(previous, f"{ref}@hidden_states")
            last_layer = ref
        previous = ref
    part.classes.same(last_layer, "encoder[last_hidden_state]")
    part.classes.same("final_layer_norm", "last_hidden_state")
    for name in ("last_hidden_state", "pooler_output", "@input_ids"):
        part.is_(name, name)
    for name in ("last_hidden_state", "pooler_output"):
        part.stands_for(f"text_model[{name}]", name)
    part.stands_for("text_model.encoder[last_hidden_state]", "encoder[last_hidden_state]")
    return part
