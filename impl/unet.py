"""The conditional UNet of SD 1.x, 2.x and SDXL (diffusers' UNet2DConditionModel layout and config.json
fields): 1x1-conv or linear transformer projections, per-block attention heads, per-level transformer
depth, and SDXL's text_time added embedding (pooled text embeds and micro-conditioning time ids).

Building blocks shared with the VAE live here too: the ResNet block, attention (token and spatial
forms), down/upsamplers and the mid block. Every module is built from a Scope, so its weight names
and tap names are its diffusers module path. The arithmetic follows the reference op for op (same
operand layouts, same order of additions and divisions): see docs/precision.md.
"""
from __future__ import annotations

from typing import Any

from .errors import ModelInputError
from .scope import Activation, Component, Conv2d, Dropout, GroupNorm, LayerNorm, Linear, Scope


# ---------------------------------------------------------------------------------------------
# Shared building blocks
# ---------------------------------------------------------------------------------------------

class ResnetBlock2D:
    """norm1 -> act -> conv1 (+ time_emb_proj(act(temb))) -> norm2 -> act -> dropout -> conv2, plus
    the (1x1-projected when channels change) input, divided by output_scale_factor."""

    def __init__(self, s: Scope, in_channels: int, out_channels: int, temb_channels: int | None, groups: int,
                 eps: float, act: str = "silu", output_scale_factor: float = 1.0):
        self.s, self.ops = s, s.ops
        self.norm1 = GroupNorm(s.pp("norm1"), groups, in_channels, eps)
        self.conv1 = Conv2d(s.pp("conv1"), in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(s.pp("time_emb_proj"), temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(s.pp("norm2"), groups, out_channels, eps)
        self.dropout = Dropout(s.pp("dropout"))
        self.conv2 = Conv2d(s.pp("conv2"), out_channels, out_channels, 3, padding=1)
        self.nonlinearity = Activation(s.pp("nonlinearity"), act)  # one module, called 2 or 3 times
        self.conv_shortcut = (Conv2d(s.pp("conv_shortcut"), in_channels, out_channels, 1)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def __call__(self, input_tensor, temb=None):
        ops = self.ops
        h = self.norm1(input_tensor)
        h = self.nonlinearity(h)
        h = self.conv1(h)
        if self.time_emb_proj is not None:
            t = self.time_emb_proj(self.nonlinearity(temb))
            h = ops.add(h, ops.reshape(t, (t.shape[0], t.shape[1], 1, 1)))
        h = self.norm2(h)
        h = self.nonlinearity(h)
        h = self.dropout(h)
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        out = ops.add(input_tensor, h)
        if self.output_scale_factor != 1:
            out = ops.div(out, self.output_scale_factor)
        return self.s.tap(out)


class Attention:
    """Multi-head attention as diffusers' Attention + AttnProcessor2_0 computes it.

    Token form (transformer blocks): x (B, N, C), optional context (B, M, Cc).
    Spatial form (VAE mid block, `group_norm_groups` set): x (B, C, H, W) is flattened to tokens,
    group-normed, attended, reshaped back and added to the input (residual), then divided by
    `rescale_output_factor`."""

    def __init__(self, s: Scope, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 bias: bool = False, group_norm_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0):
        self.s, self.ops = s, s.ops
        inner = heads * head_dim
        self.heads = heads
        self.group_norm = (GroupNorm(s.pp("group_norm"), group_norm_groups, query_dim, eps)
                           if group_norm_groups else None)
        self.to_q = Linear(s.pp("to_q"), query_dim, inner, bias=bias)
        self.to_k = Linear(s.pp("to_k"), context_dim or query_dim, inner, bias=bias)
        self.to_v = Linear(s.pp("to_v"), context_dim or query_dim, inner, bias=bias)
        out = s.pp("to_out")
        self.to_out_0 = Linear(out.pp(0), inner, query_dim, bias=True)
        self.to_out_1 = Dropout(out.pp(1))
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor

    def __call__(self, x, context=None):
        ops = self.ops
        residual = x
        spatial = len(x.shape) == 4
        if spatial:
            b, c, h, w = x.shape
            x = ops.transpose(ops.reshape(x, (b, c, h * w)), 1, 2)
        if self.group_norm is not None:
            x = ops.transpose(self.group_norm(ops.transpose(x, 1, 2)), 1, 2)
        batch = x.shape[0] if context is None else context.shape[0]
        q = self.to_q(x)
        if context is None:
            context = x
        k = self.to_k(context)
        v = self.to_v(context)
        head_dim = k.shape[-1] // self.heads
        q = ops.transpose(ops.reshape(q, (batch, -1, self.heads, head_dim)), 1, 2)
        k = ops.transpose(ops.reshape(k, (batch, -1, self.heads, head_dim)), 1, 2)
        v = ops.transpose(ops.reshape(v, (batch, -1, self.heads, head_dim)), 1, 2)
        o = ops.attention(q, k, v)
        o = ops.reshape(ops.transpose(o, 1, 2), (batch, -1, self.heads * head_dim))
        o = self.to_out_0(o)
        o = self.to_out_1(o)
        if spatial:
            o = ops.reshape(ops.transpose(o, -1, -2), (b, c, h, w))
        if self.residual_connection:
            o = ops.add(o, residual)
        if self.rescale_output_factor != 1:
            o = ops.div(o, self.rescale_output_factor)
        return self.s.tap(o)


class Downsample2D:
    """A stride-2 3x3 conv; padding 0 means the reference's explicit (0, 1, 0, 1) zero pad first."""

    def __init__(self, s: Scope, channels: int, out_channels: int, padding: int):
        self.s, self.ops = s, s.ops
        self.padding = padding
        self.conv = Conv2d(s.pp("conv"), channels, out_channels, 3, stride=2, padding=padding)

    def __call__(self, x):
        if self.padding == 0:
            x = self.ops.pad2d(x, 0, 1, 0, 1)
        return self.s.tap(self.conv(x))


class Upsample2D:
    """Nearest 2x (or to `size`) upsampling, then a 3x3 conv."""

    def __init__(self, s: Scope, channels: int, out_channels: int):
        self.s, self.ops = s, s.ops
        self.conv = Conv2d(s.pp("conv"), channels, out_channels, 3, padding=1)

    def __call__(self, x, size=None):
        return self.s.tap(self.conv(self.ops.upsample_nearest(x, size)))


class MidBlock:
    """resnets[0], then (attention i, resnet i+1) pairs: UNetMidBlock2DCrossAttn with transformer
    attentions, UNetMidBlock2D (VAE) with spatial self-attentions."""

    def __init__(self, s: Scope, resnets: list, attentions: list):
        self.s = s
        self.resnets = resnets
        self.attentions = attentions

    def __call__(self, hidden_states, temb=None, encoder_hidden_states=None):
        self.s.tap_inputs({"hidden_states": hidden_states, "temb": temb,
                           "encoder_hidden_states": encoder_hidden_states})
        h = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = attn(h, encoder_hidden_states)
            h = resnet(h, temb)
        return self.s.tap(h)


class TimestepEmbedding:
    """linear_1 -> act -> linear_2 (diffusers' TimestepEmbedding): the time embedding's MLP, and SDXL's
    add_embedding of the pooled text embeds and time ids."""

    def __init__(self, s: Scope, in_channels: int, out_channels: int, act: str):
        self.s = s
        self.linear_1 = Linear(s.pp("linear_1"), in_channels, out_channels)
        self.act = Activation(s.pp("act"), act)
        self.linear_2 = Linear(s.pp("linear_2"), out_channels, out_channels)

    def __call__(self, x):
        return self.s.tap(self.linear_2(self.act(self.linear_1(x))))


# ---------------------------------------------------------------------------------------------
# Spatial transformer
# ---------------------------------------------------------------------------------------------

class FeedForward:
    """net.0 = GEGLU (proj, then value * gelu(gate)) or GELU (proj, gelu); net.1 dropout; net.2 linear."""

    def __init__(self, s: Scope, dim: int, activation: str = "geglu", mult: int = 4):
        self.s, self.ops = s, s.ops
        inner = dim * mult
        net = s.pp("net")
        self.act_scope = net.pp(0)
        if activation not in ("geglu", "gelu"):
            raise ModelInputError(f"{s.path}: feed-forward activation {activation!r} is not supported (geglu, gelu)")
        self.geglu = activation == "geglu"
        self.proj = Linear(self.act_scope.pp("proj"), dim, inner * 2 if self.geglu else inner)
        self.dropout = Dropout(net.pp(1))
        self.out = Linear(net.pp(2), inner, dim)

    def __call__(self, x):
        ops = self.ops
        h = self.proj(x)
        if self.geglu:
            value, gate = ops.chunk(h, 2, -1)
            h = ops.mul(value, ops.gelu(gate))
        else:
            h = ops.gelu(h)
        h = self.act_scope.tap(h)
        h = self.dropout(h)
        h = self.out(h)
        return self.s.tap(h)


class BasicTransformerBlock:
    """norm1 -> self-attention (+x), norm2 -> cross-attention (+x), norm3 -> feed-forward (+x)."""

    def __init__(self, s: Scope, dim: int, heads: int, head_dim: int, cross_attention_dim: int,
                 only_cross_attention: bool = False, eps: float = 1e-5):
        self.s, self.ops = s, s.ops
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(s.pp("norm1"), dim, eps)
        self.attn1 = Attention(s.pp("attn1"), dim, heads, head_dim,
                               context_dim=cross_attention_dim if only_cross_attention else None)
        self.norm2 = LayerNorm(s.pp("norm2"), dim, eps)
        self.attn2 = Attention(s.pp("attn2"), dim, heads, head_dim, context_dim=cross_attention_dim)
        self.norm3 = LayerNorm(s.pp("norm3"), dim, eps)
        self.ff = FeedForward(s.pp("ff"), dim)

    def __call__(self, x, context):
        ops = self.ops
        a = self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = ops.add(a, x)
        a = self.attn2(self.norm2(x), context)
        x = ops.add(a, x)
        f = self.ff(self.norm3(x))
        x = ops.add(f, x)
        return self.s.tap(x)


class Transformer2D:
    """GroupNorm, proj_in (1x1 conv, or linear on tokens with use_linear_projection), transformer
    blocks over H*W tokens, proj_out, plus the input. Output is the reference's 1-tuple."""

    def __init__(self, s: Scope, heads: int, head_dim: int, channels: int, cross_attention_dim: int, groups: int,
                 layers: int = 1, use_linear_projection: bool = False, only_cross_attention: bool = False):
        self.s, self.ops = s, s.ops
        inner = heads * head_dim
        self.linear = use_linear_projection
        self.norm = GroupNorm(s.pp("norm"), groups, channels, 1e-6)
        if self.linear:
            self.proj_in = Linear(s.pp("proj_in"), channels, inner)
            self.proj_out = Linear(s.pp("proj_out"), inner, channels)
        else:
            self.proj_in = Conv2d(s.pp("proj_in"), channels, inner, 1)
            self.proj_out = Conv2d(s.pp("proj_out"), inner, channels, 1)
        blocks = s.pp("transformer_blocks")
        self.blocks = [BasicTransformerBlock(blocks.pp(i), inner, heads, head_dim, cross_attention_dim,
                                             only_cross_attention) for i in range(layers)]

    def __call__(self, x, context=None):
        ops = self.ops
        b, _, h, w = x.shape
        residual = x
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
            inner = t.shape[1]
            t = ops.reshape(ops.permute(t, (0, 2, 3, 1)), (b, h * w, inner))
        else:
            inner = t.shape[1]
            t = ops.reshape(ops.permute(t, (0, 2, 3, 1)), (b, h * w, inner))
            t = self.proj_in(t)
        for block in self.blocks:
            t = block(t, context)
        if not self.linear:
            t = ops.contiguous(ops.permute(ops.reshape(t, (b, h, w, t.shape[-1])), (0, 3, 1, 2)))
            t = self.proj_out(t)
        else:
            t = self.proj_out(t)
            t = ops.contiguous(ops.permute(ops.reshape(t, (b, h, w, t.shape[-1])), (0, 3, 1, 2)))
        out = ops.add(t, residual)
        self.s.tap((out,))
        return out


# ---------------------------------------------------------------------------------------------
# UNet blocks
# ---------------------------------------------------------------------------------------------

class DownBlock:
    """CrossAttnDownBlock2D (with attentions) or DownBlock2D / DownEncoderBlock2D (without).
    Output: (hidden_states, (each layer's output, [the downsampled output])) as the reference
    returns it; `returns_states=False` (VAE encoder blocks) returns the hidden states alone."""

    def __init__(self, s: Scope, resnets: list, attentions: list | None, downsampler: Downsample2D | None,
                 returns_states: bool = True):
        self.s = s
        self.resnets = resnets
        self.attentions = attentions
        self.downsampler = downsampler
        self.returns_states = returns_states

    def __call__(self, hidden_states, temb=None, encoder_hidden_states=None):
        cross = self.attentions is not None
        self.s.tap_inputs({"hidden_states": hidden_states, "temb": temb,
                           "encoder_hidden_states": encoder_hidden_states if cross else None})
        h = hidden_states
        states = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if cross:
                h = self.attentions[i](h, encoder_hidden_states)
            states.append(h)
        if self.downsampler is not None:
            h = self.downsampler(h)
            states.append(h)
        if not self.returns_states:
            return self.s.tap(h)
        return self.s.tap((h, tuple(states)))


class UpBlock:
    """CrossAttnUpBlock2D / UpBlock2D: each layer concatenates the last remaining skip tensor onto
    the hidden states (channel axis) before its resnet [and attention]; then the upsampler."""

    def __init__(self, s: Scope, resnets: list, attentions: list | None, upsampler: Upsample2D | None):
        self.s, self.ops = s, s.ops
        self.resnets = resnets
        self.attentions = attentions
        self.upsampler = upsampler

    def __call__(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                 upsample_size=None):
        ops = self.ops
        cross = self.attentions is not None
        skips = tuple(res_hidden_states_tuple)
        self.s.tap_inputs({"hidden_states": hidden_states, "res_hidden_states_tuple": skips, "temb": temb,
                           "encoder_hidden_states": encoder_hidden_states if cross else None})
        if len(skips) != len(self.resnets):
            raise ModelInputError(f"{self.s.path} takes {len(self.resnets)} skip tensors, got {len(skips)}")
        h = hidden_states
        for i, resnet in enumerate(self.resnets):
            skip, skips = skips[-1], skips[:-1]
            h = ops.cat([h, skip], 1)
            h = resnet(h, temb)
            if cross:
                h = self.attentions[i](h, encoder_hidden_states)
        if self.upsampler is not None:
            h = self.upsampler(h, upsample_size)
        return self.s.tap(h)


class UpDecoderBlock:
    """The VAE decoder's UpDecoderBlock2D: resnets, then the upsampler."""

    def __init__(self, s: Scope, resnets: list, upsampler: Upsample2D | None):
        self.s = s
        self.resnets = resnets
        self.upsampler = upsampler

    def __call__(self, hidden_states, temb=None):
        self.s.tap_inputs({"hidden_states": hidden_states, "temb": temb})
        h = hidden_states
        for resnet in self.resnets:
            h = resnet(h, temb)
        if self.upsampler is not None:
            h = self.upsampler(h)
        return self.s.tap(h)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

# config.json fields that change the architecture away from SD 1.x/2.x/SDXL, with the values supported here
_FIXED = {
    "time_embedding_type": ("positional",), "resnet_time_scale_shift": ("default",), "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,), "timestep_post_act": (None,), "time_embedding_act_fn": (None,),
    "dual_cross_attention": (False,), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
    "cross_attention_norm": (None,), "attention_type": ("default",), "num_class_embeds": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "class_embeddings_concat": (False,),
    "reverse_transformer_layers_per_block": (None,),
}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value, count: int, field: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ModelInputError(f"unet config.json: {field} has {len(value)} entries for {count} blocks")
        return list(value)
    return [value] * count


class UNetConfig:
    """The UNet2DConditionModel config.json fields this implementation reads (diffusers defaults)."""

    def __init__(self, config: dict[str, Any]):
        get = config.get
        for field, allowed in _FIXED.items():
            if get(field, allowed[0]) not in allowed:
                raise ModelInputError(f"unet config.json: {field}={get(field)!r} is not supported by this SD 1.x/2.x/"
                                      f"SDXL implementation (supported: {', '.join(map(repr, allowed))})")
        self.in_channels = int(get("in_channels", 4))
        self.out_channels = int(get("out_channels", 4))
        self.center_input_sample = bool(get("center_input_sample", False))
        self.flip_sin_to_cos = bool(get("flip_sin_to_cos", True))
        self.freq_shift = get("freq_shift", 0)
        self.down_block_types = list(get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        self.up_block_types = list(get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        self.block_out_channels = list(get("block_out_channels", [320, 640, 1280, 1280]))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ModelInputError("unet config.json: down_block_types, up_block_types and block_out_channels "
                                  "must have the same length")
        for kind in self.down_block_types:
            if kind not in _DOWN_TYPES:
                raise ModelInputError(f"unet config.json: down block type {kind!r} is not supported ({_DOWN_TYPES})")
        for kind in self.up_block_types:
            if kind not in _UP_TYPES:
                raise ModelInputError(f"unet config.json: up block type {kind!r} is not supported ({_UP_TYPES})")
        self.layers_per_block = _per_block(get("layers_per_block", 2), n, "layers_per_block")
        self.downsample_padding = int(get("downsample_padding", 1))
        self.mid_block_scale_factor = get("mid_block_scale_factor", 1)
        self.act_fn = get("act_fn", "silu")
        self.norm_num_groups = get("norm_num_groups", 32)
        if self.norm_num_groups is None:
            raise ModelInputError("unet config.json: norm_num_groups=None is not supported")
        self.norm_eps = float(get("norm_eps", 1e-5))
        self.cross_attention_dim = _per_block(get("cross_attention_dim", 1280), n, "cross_attention_dim")
        self.transformer_layers_per_block = _per_block(get("transformer_layers_per_block", 1), n,
                                                       "transformer_layers_per_block")
        # SD 1.x's attention_head_dim is the number of heads (diffusers' naming issue #2011);
        # an explicit num_attention_heads takes precedence.
        heads = get("num_attention_heads") or get("attention_head_dim", 8)
        self.num_attention_heads = _per_block(heads, n, "num_attention_heads/attention_head_dim")
        self.use_linear_projection = bool(get("use_linear_projection", False))
        only_cross = get("only_cross_attention", False)
        self.only_cross_attention = _per_block(only_cross, n, "only_cross_attention")
        mid_only = get("mid_block_only_cross_attention")
        self.mid_block_only_cross_attention = (bool(mid_only) if mid_only is not None else
                                               (bool(only_cross) if isinstance(only_cross, bool) else False))
        # Attention in float32 for half-precision weights: both backends always compute the scores and
        # the softmax with float32 accumulation (NumPy: float32 compute dtype; torch: scaled_dot_product_
        # attention, whose CPU and CUDA kernels accumulate half inputs in float32), which is what this
        # flag asks for, and what the reference's default attention processor (AttnProcessor2_0) does
        # whatever the flag says. docs/precision.md has the measurement.
        self.upcast_attention = bool(get("upcast_attention") or False)
        self.addition_embed_type = get("addition_embed_type")
        if self.addition_embed_type == "text_time":
            for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(get(field), int):
                    raise ModelInputError(f"unet config.json: addition_embed_type 'text_time' needs an integer {field}")
            self.addition_time_embed_dim = int(get("addition_time_embed_dim"))
            self.projection_class_embeddings_input_dim = int(get("projection_class_embeddings_input_dim"))
        self.conv_in_kernel = int(get("conv_in_kernel", 3))
        self.conv_out_kernel = int(get("conv_out_kernel", 3))
        self.time_embedding_dim = get("time_embedding_dim")


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------

class UNet(Component):
    """UNet2DConditionModel. `unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, taps=None)`
    returns the model output (noise or v prediction); `added_cond_kwargs` = {"text_embeds", "time_ids"}
    for addition_embed_type "text_time" (SDXL). Blocks: down_blocks.i, mid_block, up_blocks.i."""

    name = "unet"
    _float32_inputs = ("timestep",)

    def __init__(self, config: dict[str, Any], store, ops):
        cfg = self.config = UNetConfig(config)
        self.ops = ops
        self.scope = root = Scope.root(store, ops)
        channels = cfg.block_out_channels
        groups, eps, act = cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn
        c0 = channels[0]
        temb_channels = cfg.time_embedding_dim or c0 * 4

        self.conv_in = Conv2d(root.pp("conv_in"), cfg.in_channels, c0, cfg.conv_in_kernel,
                              padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_proj = root.pp("time_proj")
        self.time_embedding = TimestepEmbedding(root.pp("time_embedding"), c0, temb_channels, act)
        if cfg.addition_embed_type == "text_time":
            self.add_time_proj = root.pp("add_time_proj")
            self.add_embedding = TimestepEmbedding(root.pp("add_embedding"), cfg.projection_class_embeddings_input_dim,
                                                   temb_channels, act)

        def transformer(s, heads, out_channels, cross_dim, layers, only_cross):
            return Transformer2D(s, heads, out_channels // heads, out_channels, cross_dim, groups, layers,
                                 cfg.use_linear_projection, only_cross)

        self.down_blocks: list[DownBlock] = []
        output_channel = c0
        for i, kind in enumerate(cfg.down_block_types):
            s = root.pp("down_blocks").pp(i)
            input_channel, output_channel = output_channel, channels[i]
            final = i == len(channels) - 1
            resnets, attentions = [], [] if kind == "CrossAttnDownBlock2D" else None
            for j in range(cfg.layers_per_block[i]):
                resnets.append(ResnetBlock2D(s.pp("resnets").pp(j), input_channel if j == 0 else output_channel,
                                             output_channel, temb_channels, groups, eps, act))
                if attentions is not None:
                    attentions.append(transformer(s.pp("attentions").pp(j), cfg.num_attention_heads[i], output_channel,
                                                  cfg.cross_attention_dim[i], cfg.transformer_layers_per_block[i],
                                                  cfg.only_cross_attention[i]))
            down = None if final else Downsample2D(s.pp("downsamplers").pp(0), output_channel, output_channel,
                                                   cfg.downsample_padding)
            self.down_blocks.append(DownBlock(s, resnets, attentions, down))

        s = root.pp("mid_block")
        c_mid = channels[-1]
        self.mid_block = MidBlock(
            s,
            [ResnetBlock2D(s.pp("resnets").pp(j), c_mid, c_mid, temb_channels, groups, eps, act,
                           cfg.mid_block_scale_factor) for j in range(2)],
            [transformer(s.pp("attentions").pp(0), cfg.num_attention_heads[-1], c_mid, cfg.cross_attention_dim[-1],
                         cfg.transformer_layers_per_block[-1], cfg.mid_block_only_cross_attention)])

        self.up_blocks: list[UpBlock] = []
        rev_channels = list(reversed(channels))
        rev_heads = list(reversed(cfg.num_attention_heads))
        rev_layers = list(reversed(cfg.layers_per_block))
        rev_cross = list(reversed(cfg.cross_attention_dim))
        rev_tlayers = list(reversed(cfg.transformer_layers_per_block))
        rev_only_cross = list(reversed(cfg.only_cross_attention))
        output_channel = rev_channels[0]
        for i, kind in enumerate(cfg.up_block_types):
            s = root.pp("up_blocks").pp(i)
            final = i == len(channels) - 1
            prev_output_channel, output_channel = output_channel, rev_channels[i]
            input_channel = rev_channels[min(i + 1, len(channels) - 1)]
            layers = rev_layers[i] + 1
            resnets, attentions = [], [] if kind == "CrossAttnUpBlock2D" else None
            for j in range(layers):
                skip_channels = input_channel if j == layers - 1 else output_channel
                in_channels = prev_output_channel if j == 0 else output_channel
                resnets.append(ResnetBlock2D(s.pp("resnets").pp(j), in_channels + skip_channels, output_channel,
                                             temb_channels, groups, eps, act))
                if attentions is not None:
                    attentions.append(transformer(s.pp("attentions").pp(j), rev_heads[i], output_channel,
                                                  rev_cross[i], rev_tlayers[i], rev_only_cross[i]))
            up = None if final else Upsample2D(s.pp("upsamplers").pp(0), output_channel, output_channel)
            self.up_blocks.append(UpBlock(s, resnets, attentions, up))

        self.conv_norm_out = GroupNorm(root.pp("conv_norm_out"), groups, c0, eps)
        self.conv_act = Activation(root.pp("conv_act"), act)
        self.conv_out = Conv2d(root.pp("conv_out"), c0, cfg.out_channels, cfg.conv_out_kernel,
                               padding=(cfg.conv_out_kernel - 1) // 2)
        store.finish("Is this an SD UNet (UNet2DConditionModel) whose config.json matches its weights?")

        self._blocks = {"": self._root_block}
        for block in (*self.down_blocks, self.mid_block, *self.up_blocks):
            self._blocks[block.s.path] = block

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    # --- forward -------------------------------------------------------------------------------
    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, taps=None):
        """The model output for `sample` (B, in_channels, h, w) at `timestep` (scalar, (1,) or (B,);
        integer or float), conditioned on `encoder_hidden_states` (B, 77, cross_attention_dim) and, for
        a text_time UNet, `added_cond_kwargs` {"text_embeds": (B, projection dim), "time_ids": (B, 6)}."""
        ops = self.ops
        sample, encoder_hidden_states = ops.asarray(sample), ops.asarray(encoder_hidden_states)
        timestep = ops.asarray(timestep, "fp32")  # integers stay int64; floats go through float32 anyway
        if added_cond_kwargs is not None:
            added_cond_kwargs = {key: ops.asarray(value) for key, value in added_cond_kwargs.items()}
        with self.scope.bind(taps), ops.inference():
            return self._root_block(sample, timestep, encoder_hidden_states, added_cond_kwargs)[0]

    def _root_block(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        self.scope.tap_inputs({"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                               "added_cond_kwargs": added_cond_kwargs})
        out = self._forward(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        return self.scope.tap((out,))

    def time_embed(self, sample, timestep):
        """time_proj (float32), cast to the model dtype, then the time-embedding MLP."""
        ops = self.ops
        timesteps = ops.expand_batch(timestep, sample.shape[0])
        t_emb = self.time_proj.tap(ops.timestep_embedding(timesteps, self.config.block_out_channels[0],
                                                          self.config.flip_sin_to_cos, self.config.freq_shift))
        return self.time_embedding(ops.cast(t_emb))

    def added_embed(self, added_cond_kwargs):
        """SDXL's text_time embedding: the time ids embedded sinusoidally (float32), concatenated after the
        pooled text embeds (in float32, as torch.concat promotes), cast to the model dtype, then the MLP."""
        ops, cfg = self.ops, self.config
        missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
        if missing:
            raise ModelInputError(f"unet: addition_embed_type 'text_time' needs added_cond_kwargs {missing}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj.tap(ops.timestep_embedding(
            ops.reshape(time_ids, (-1,)), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift))
        time_embeds = ops.reshape(time_embeds, (text_embeds.shape[0], -1))
        width = text_embeds.shape[-1] + time_embeds.shape[-1]
        if width != cfg.projection_class_embeddings_input_dim:
            raise ModelInputError(f"unet: text_embeds ({text_embeds.shape[-1]}) and {time_ids.shape[-1]} time ids "
                                  f"({time_embeds.shape[-1]}) make {width} channels; add_embedding takes "
                                  f"{cfg.projection_class_embeddings_input_dim}")
        return self.add_embedding(ops.cast(ops.cat([text_embeds, time_embeds], -1)))

    def _forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        ops, cfg = self.ops, self.config
        if sample.shape[1] != cfg.in_channels:
            raise ModelInputError(f"unet: sample has {sample.shape[1]} channels; this UNet takes {cfg.in_channels}")
        up_factor = 2 ** (len(self.up_blocks) - 1)
        forward_upsample_size = any(dim % up_factor for dim in sample.shape[-2:])
        if cfg.center_input_sample:
            sample = ops.scale_shift(sample, 2.0, -1.0)
        emb = self.time_embed(sample, timestep)
        if cfg.addition_embed_type == "text_time":
            emb = ops.add(emb, self.added_embed(added_cond_kwargs))
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            if block.attentions is not None:
                h, states = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, states = block(hidden_states=h, temb=emb)
            skips.extend(states)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = tuple(skips[-n:]), skips[:-n]
            upsample_size = skips[-1].shape[2:] if (i < len(self.up_blocks) - 1 and forward_upsample_size) else None
            if block.attentions is not None:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        h = self.conv_norm_out(h)
        h = self.conv_act(h)
        return self.conv_out(h)


__all__ = ["Attention", "BasicTransformerBlock", "DownBlock", "Downsample2D", "FeedForward", "MidBlock",
           "ResnetBlock2D", "TimestepEmbedding", "Transformer2D", "UNet", "UNetConfig", "UpBlock", "UpDecoderBlock",
           "Upsample2D"]
