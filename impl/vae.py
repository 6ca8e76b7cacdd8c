"""The SD/SDXL VAE (diffusers' AutoencoderKL layout and config.json fields): decoder and encoder.

Module paths are relative to the autoencoder, as the reference names them: `post_quant_conv`,
`decoder.up_blocks.0.resnets.0.conv1`, `encoder.down_blocks.0`, `quant_conv`. The two halves are
two components over one weight store: `vae.decoder` ("vae_decoder") and `vae.encoder` ("vae_encoder").
"""
from __future__ import annotations

from typing import Any

from .errors import ModelInputError
from .scope import Activation, Component, Conv2d, GroupNorm, Scope
from .unet import Attention, DownBlock, Downsample2D, MidBlock, ResnetBlock2D, UpDecoderBlock, Upsample2D

_EPS = 1e-6  # the VAE's norms use eps 1e-6 whatever norm_eps says


class VaeConfig:
    def __init__(self, config: dict[str, Any]):
        get = config.get
        self.in_channels = int(get("in_channels", 3))
        self.out_channels = int(get("out_channels", 3))
        self.latent_channels = int(get("latent_channels", 4))
        self.block_out_channels = list(get("block_out_channels", [64]))
        n = len(self.block_out_channels)
        down = list(get("down_block_types", ["DownEncoderBlock2D"] * n))
        up = list(get("up_block_types", ["UpDecoderBlock2D"] * n))
        if any(t != "DownEncoderBlock2D" for t in down) or any(t != "UpDecoderBlock2D" for t in up):
            raise ModelInputError(f"vae config.json: block types {down} / {up} are not supported "
                                  "(DownEncoderBlock2D / UpDecoderBlock2D)")
        if len(down) != n or len(up) != n:
            raise ModelInputError("vae config.json: block types and block_out_channels differ in length")
        self.layers_per_block = int(get("layers_per_block", 1))
        self.norm_num_groups = int(get("norm_num_groups", 32))
        self.act_fn = get("act_fn", "silu")
        self.scaling_factor = float(get("scaling_factor", 0.18215))
        shift = get("shift_factor")
        self.shift_factor = None if shift is None else float(shift)
        self.use_quant_conv = bool(get("use_quant_conv", True))
        self.use_post_quant_conv = bool(get("use_post_quant_conv", True))
        self.mid_block_add_attention = bool(get("mid_block_add_attention", True))
        self.force_upcast = bool(get("force_upcast", True))


def _mid_block(s: Scope, channels: int, groups: int, act: str, add_attention: bool) -> MidBlock:
    resnets = [ResnetBlock2D(s.pp("resnets").pp(j), channels, channels, None, groups, _EPS, act) for j in range(2)]
    attentions = []
    if add_attention:
        # one head of width `channels` (attention_head_dim = channels), residual, bias on q/k/v
        attentions.append(Attention(s.pp("attentions").pp(0), channels, 1, channels, bias=True,
                                    group_norm_groups=groups, eps=_EPS, residual_connection=True))
    else:
        attentions.append(lambda h, context=None: h)
    return MidBlock(s, resnets, attentions)


class VaeDecoder(Component):
    """`decoder(z, taps=None)` -> image (B, out_channels, 8h, 8w) in [-1, 1] (unclipped); z is the
    latent already divided by the scaling factor, as the reference's `vae.decode(z)` takes it."""

    name = "vae_decoder"

    def __init__(self, cfg: VaeConfig, root: Scope):
        self.cfg, self.scope, self.ops = cfg, root, root.ops
        channels, groups, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        latent = cfg.latent_channels
        self.post_quant_conv = (Conv2d(root.pp("post_quant_conv"), latent, latent, 1)
                                if cfg.use_post_quant_conv else None)
        d = self.decoder_scope = root.pp("decoder")
        self.conv_in = Conv2d(d.pp("conv_in"), latent, channels[-1], 3, padding=1)
        self.mid_block = _mid_block(d.pp("mid_block"), channels[-1], groups, act, cfg.mid_block_add_attention)
        self.up_blocks = []
        reversed_channels = list(reversed(channels))
        output_channel = reversed_channels[0]
        for i in range(len(channels)):
            s = d.pp("up_blocks").pp(i)
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            final = i == len(channels) - 1
            resnets = [ResnetBlock2D(s.pp("resnets").pp(j), prev_output_channel if j == 0 else output_channel,
                                     output_channel, None, groups, _EPS, act)
                       for j in range(cfg.layers_per_block + 1)]
            up = None if final else Upsample2D(s.pp("upsamplers").pp(0), output_channel, output_channel)
            self.up_blocks.append(UpDecoderBlock(s, resnets, up))
        self.conv_norm_out = GroupNorm(d.pp("conv_norm_out"), groups, channels[0], _EPS)
        self.conv_act = Activation(d.pp("conv_act"), "silu")
        self.conv_out = Conv2d(d.pp("conv_out"), channels[0], cfg.out_channels, 3, padding=1)
        self._blocks = {"": self._root_block, self.mid_block.s.path: self.mid_block,
                        **{b.s.path: b for b in self.up_blocks}}

    def __call__(self, z, taps=None):
        z = self.ops.asarray(z)
        with self.scope.bind(taps), self.ops.inference():
            return self._root_block(z)[0]

    def _root_block(self, z):
        self.scope.tap_inputs({"z": z})
        h = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        h = self.conv_in(h)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)
        h = self.conv_norm_out(h)
        h = self.conv_act(h)
        h = self.decoder_scope.tap(self.conv_out(h))
        return self.scope.tap((h,))


class VaeEncoder(Component):
    """`encoder(x, taps=None)` -> (mean, logvar) of the latent posterior for images x in [-1, 1];
    `sample(mean, logvar, noise)` draws mean + exp(logvar / 2) * noise with the caller's noise."""

    name = "vae_encoder"

    def __init__(self, cfg: VaeConfig, root: Scope):
        self.cfg, self.scope, self.ops = cfg, root, root.ops
        channels, groups, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        e = self.encoder_scope = root.pp("encoder")
        self.conv_in = Conv2d(e.pp("conv_in"), cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = []
        output_channel = channels[0]
        for i in range(len(channels)):
            s = e.pp("down_blocks").pp(i)
            input_channel, output_channel = output_channel, channels[i]
            final = i == len(channels) - 1
            resnets = [ResnetBlock2D(s.pp("resnets").pp(j), input_channel if j == 0 else output_channel,
                                     output_channel, None, groups, _EPS, act) for j in range(cfg.layers_per_block)]
            down = None if final else Downsample2D(s.pp("downsamplers").pp(0), output_channel, output_channel, 0)
            self.down_blocks.append(DownBlock(s, resnets, None, down, returns_states=False))
        self.mid_block = _mid_block(e.pp("mid_block"), channels[-1], groups, act, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(e.pp("conv_norm_out"), groups, channels[-1], _EPS)
        self.conv_act = Activation(e.pp("conv_act"), "silu")
        moments = 2 * cfg.latent_channels
        self.conv_out = Conv2d(e.pp("conv_out"), channels[-1], moments, 3, padding=1)
        self.quant_conv = Conv2d(root.pp("quant_conv"), moments, moments, 1) if cfg.use_quant_conv else None
        self._blocks = {"": self._root_block, **{b.s.path: b for b in self.down_blocks},
                        self.mid_block.s.path: self.mid_block}

    def __call__(self, x, taps=None):
        x = self.ops.asarray(x)
        with self.scope.bind(taps), self.ops.inference():
            out = self._root_block(x)
        return out["mean"], out["logvar"]

    def _root_block(self, x):
        ops = self.ops
        self.scope.tap_inputs({"x": x})
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        h = self.conv_norm_out(h)
        h = self.conv_act(h)
        h = self.encoder_scope.tap(self.conv_out(h))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = ops.chunk(h, 2, 1)
        logvar = ops.clamp(logvar, -30.0, 20.0)
        return self.scope.tap({"mean": mean, "logvar": logvar})

    def sample(self, mean, logvar, noise):
        """A posterior sample with caller-provided standard normal `noise` (the shape of `mean`)."""
        ops = self.ops
        noise = ops.asarray(noise)
        if tuple(noise.shape) != tuple(mean.shape):
            raise ModelInputError(f"vae: noise has shape {tuple(noise.shape)}; the latent is {tuple(mean.shape)}")
        with ops.inference():
            std = ops.exp(ops.mul(logvar, 0.5))
            return ops.add(mean, ops.mul(std, noise))


class AutoencoderKL:
    """Both halves over one weight store; `scaling_factor` from config.json. `part_ops` gives a half its own
    op set (a pipeline that runs the VAE at float32 under half-precision weights: SDXL's force_upcast)."""

    def __init__(self, config: dict[str, Any], store, ops, parts: tuple[str, ...] = ("encoder", "decoder"),
                 part_ops: dict[str, Any] | None = None):
        self.config = cfg = VaeConfig(config)
        self.ops = ops
        part_ops = part_ops or {}
        self.decoder = VaeDecoder(cfg, Scope.root(store, part_ops.get("decoder", ops))) if "decoder" in parts else None
        self.encoder = VaeEncoder(cfg, Scope.root(store, part_ops.get("encoder", ops))) if "encoder" in parts else None
        if self.decoder is None:
            store.ignore_prefix("decoder.")
            store.ignore_prefix("post_quant_conv.")
        if self.encoder is None:
            store.ignore_prefix("encoder.")
            store.ignore_prefix("quant_conv.")
        store.finish("Is this an SD VAE (AutoencoderKL) whose config.json matches its weights?")

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def decode(self, z, taps=None):
        return self.decoder(z, taps)

    def encode(self, x, taps=None):
        return self.encoder(x, taps)


__all__ = ["AutoencoderKL", "VaeConfig", "VaeDecoder", "VaeEncoder"]
