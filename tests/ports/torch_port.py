"""A PyTorch port of Stable Diffusion 1.x written in another style than impl/: the test double of a
third-party port, which sd-parity sees only through its public API.

Its own module names (`enc`/`mid`/`dec`, `stack.layers`, `body.ups`), fused projections (q/k/v in one
linear for self-attention, k/v in one for cross-attention), its own weight loading from a diffusers
folder, and its own DDIM loop. It reports block-level tensors (`tensors = "blocks"`) through
sd_parity.capture with a name map, its pipeline tensors through sd_parity.tap, and runs blocks and
pipeline stages alone for isolated mode.

    parity run --model tiny-sd1 --candidate tests/ports/torch_port.py:make --output-dir reports/port

`make_faulty()` is the same port with a classic porting bug: the feed-forward's GEGLU gate uses the
tanh approximation of GELU, where SD uses the exact one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import sd_parity

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- layers built from a diffusers state dict ------------------------------------------------------

def _linear(w: dict, *keys: str, bias: bool = True) -> nn.Linear:
    """One linear layer from the weights at `keys`, fused along the output features when several."""
    weight = torch.cat([w[f"{k}.weight"] for k in keys])
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(torch.cat([w[f"{k}.bias"] for k in keys]))
    return layer


def _conv(w: dict, key: str, stride: int = 1) -> nn.Conv2d:
    weight = w[f"{key}.weight"]
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], stride=stride, padding=weight.shape[2] // 2)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(w[f"{key}.bias"])
    return layer


def _norm(cls, w: dict, key: str, *args) -> nn.Module:
    layer = cls(*args)
    with torch.no_grad():
        layer.weight.copy_(w[f"{key}.weight"])
        layer.bias.copy_(w[f"{key}.bias"])
    return layer


def _group_norm(w: dict, key: str, groups: int, eps: float) -> nn.GroupNorm:
    return _norm(nn.GroupNorm, w, key, groups, w[f"{key}.weight"].shape[0], eps)


def _layer_norm(w: dict, key: str, eps: float = 1e-5) -> nn.LayerNorm:
    return _norm(nn.LayerNorm, w, key, w[f"{key}.weight"].shape[0], eps)


def _heads_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def _heads_merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


# --- CLIP text encoder ------------------------------------------------------------------------------

class Embed(nn.Module):
    def __init__(self, w: dict):
        super().__init__()
        self.tok = nn.Embedding.from_pretrained(w["text_model.embeddings.token_embedding.weight"])
        self.pos = nn.Embedding.from_pretrained(w["text_model.embeddings.position_embedding.weight"])

    def forward(self, ids):
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])


class ClipLayer(nn.Module):
    def __init__(self, w: dict, key: str, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = _layer_norm(w, f"{key}.layer_norm1"), _layer_norm(w, f"{key}.layer_norm2")
        self.qkv = _linear(w, *(f"{key}.self_attn.{p}_proj" for p in "qkv"))
        self.proj = _linear(w, f"{key}.self_attn.out_proj")
        self.up, self.down = _linear(w, f"{key}.mlp.fc1"), _linear(w, f"{key}.mlp.fc2")

    def forward(self, x):
        q, k, v = (_heads_split(t, self.heads) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        x = x + self.proj(_heads_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        h = self.up(self.ln2(x))
        return x + self.down(h * torch.sigmoid(1.702 * h))  # quick GELU


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TextEncoder(nn.Module):
    def __init__(self, w: dict, config: dict):
        super().__init__()
        self.embed = Embed(w)
        self.stack = Stack([ClipLayer(w, f"text_model.encoder.layers.{i}", config["num_attention_heads"])
                            for i in range(config["num_hidden_layers"])])
        self.ln_f = _layer_norm(w, "text_model.final_layer_norm", config["layer_norm_eps"])

    def forward(self, ids):
        last = self.ln_f(self.stack(self.embed(ids)))
        return {"last_hidden_state": last, "pooler_output": last[torch.arange(ids.shape[0]), ids.argmax(-1)]}


# --- UNet ---------------------------------------------------------------------------------------------

class TimeFreq(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.register_buffer("freqs", torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half))

    def forward(self, t):
        angles = t[:, None].float() * self.freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Res(nn.Module):
    def __init__(self, w: dict, key: str, groups: int, eps: float):
        super().__init__()
        self.norm1, self.norm2 = (_group_norm(w, f"{key}.norm{i}", groups, eps) for i in (1, 2))
        self.conv1, self.conv2 = _conv(w, f"{key}.conv1"), _conv(w, f"{key}.conv2")
        self.emb = _linear(w, f"{key}.time_emb_proj") if f"{key}.time_emb_proj.weight" in w else None
        self.skip = _conv(w, f"{key}.conv_shortcut") if f"{key}.conv_shortcut.weight" in w else nn.Identity()

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    """Self-attention with one fused q/k/v projection, or cross-attention with a fused k/v one."""

    def __init__(self, w: dict, key: str, heads: int, cross: bool):
        super().__init__()
        self.heads, self.cross = heads, cross
        if cross:
            self.q = _linear(w, f"{key}.to_q", bias=False)
            self.kv = _linear(w, f"{key}.to_k", f"{key}.to_v", bias=False)
        else:
            self.qkv = _linear(w, f"{key}.to_q", f"{key}.to_k", f"{key}.to_v", bias=False)
        self.out = _linear(w, f"{key}.to_out.0")

    def forward(self, x, context=None):
        if self.cross:
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (_heads_split(t, self.heads) for t in (q, k, v))
        return self.out(_heads_merge(F.scaled_dot_product_attention(q, k, v)))


class FeedForward(nn.Module):
    def __init__(self, w: dict, key: str, exact_gelu: bool):
        super().__init__()
        self.gate_proj, self.out = _linear(w, f"{key}.net.0.proj"), _linear(w, f"{key}.net.2")
        self.approximate = "none" if exact_gelu else "tanh"

    def forward(self, x):
        h, gate = self.gate_proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate, approximate=self.approximate))


class TransformerLayer(nn.Module):
    def __init__(self, w: dict, key: str, heads: int, exact_gelu: bool):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (_layer_norm(w, f"{key}.norm{i}") for i in (1, 2, 3))
        self.self_attn = Attention(w, f"{key}.attn1", heads, cross=False)
        self.cross_attn = Attention(w, f"{key}.attn2", heads, cross=True)
        self.ff = FeedForward(w, f"{key}.ff", exact_gelu)

    def forward(self, x, context):
        x = self.self_attn(self.ln1(x)) + x
        x = self.cross_attn(self.ln2(x), context) + x
        return self.ff(self.ln3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, w: dict, key: str, heads: int, groups: int, exact_gelu: bool):
        super().__init__()
        self.norm = _group_norm(w, f"{key}.norm", groups, 1e-6)
        self.proj_in, self.proj_out = _conv(w, f"{key}.proj_in"), _conv(w, f"{key}.proj_out")
        self.layers = nn.ModuleList([TransformerLayer(w, f"{key}.transformer_blocks.0", heads, exact_gelu)])

    def forward(self, x, context):
        batch, channels, height, width = x.shape
        h = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        for layer in self.layers:
            h = layer(h, context)
        return self.proj_out(h.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()) + x


class Downsample(nn.Module):
    def __init__(self, w: dict, key: str):
        super().__init__()
        self.conv = _conv(w, key, stride=2)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, w: dict, key: str):
        super().__init__()
        self.conv = _conv(w, key)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets, each followed by a transformer where the level has them, and a
    resampling conv (strided on the way down, after a nearest-neighbour upsampling on the way up)."""

    resampler = ("downsamplers", Downsample)

    def __init__(self, w: dict, key: str, layers: int, heads: int, groups: int, exact_gelu: bool):
        super().__init__()
        self.res = nn.ModuleList([Res(w, f"{key}.resnets.{i}", groups, 1e-5) for i in range(layers)])
        self.tf = nn.ModuleList([SpatialTransformer(w, f"{key}.attentions.{i}", heads, groups, exact_gelu)
                                 for i in range(layers) if f"{key}.attentions.{i}.norm.weight" in w])
        folder, resample = self.resampler
        conv = f"{key}.{folder}.0.conv"
        self.resample = resample(w, conv) if f"{conv}.weight" in w else None

    def layer(self, i: int, x, emb, context):
        x = self.res[i](x, emb)
        return self.tf[i](x, context) if self.tf else x


class EncoderLevel(Level):
    def forward(self, x, emb, context=None):
        skips = []
        for i in range(len(self.res)):
            x = self.layer(i, x, emb, context)
            skips.append(x)
        if self.resample is not None:
            x = self.resample(x)
            skips.append(x)
        return x, tuple(skips)


class DecoderLevel(Level):
    """Each resnet takes the next skip connection, from the end."""

    resampler = ("upsamplers", Upsample)

    def forward(self, x, skips, emb, context=None):
        for i in range(len(self.res)):
            x = self.layer(i, torch.cat([x, skips[len(skips) - 1 - i]], dim=1), emb, context)
        return self.resample(x) if self.resample is not None else x


class Middle(nn.Module):
    def __init__(self, w: dict, key: str, heads: int, groups: int, exact_gelu: bool):
        super().__init__()
        self.res_in, self.res_out = Res(w, f"{key}.resnets.0", groups, 1e-5), Res(w, f"{key}.resnets.1", groups, 1e-5)
        self.tf = SpatialTransformer(w, f"{key}.attentions.0", heads, groups, exact_gelu)

    def forward(self, x, emb, context):
        return self.res_out(self.tf(self.res_in(x, emb), context), emb)


class UNet(nn.Module):
    def __init__(self, w: dict, config: dict, exact_gelu: bool = True):
        super().__init__()
        heads, groups, layers = config["attention_head_dim"], config["norm_num_groups"], config["layers_per_block"]
        levels = len(config["block_out_channels"])
        self.stem = _conv(w, "conv_in")
        self.t_freq = TimeFreq(config["block_out_channels"][0])
        self.t_mlp = nn.Sequential(_linear(w, "time_embedding.linear_1"), nn.SiLU(),
                                   _linear(w, "time_embedding.linear_2"))
        self.enc = nn.ModuleList([EncoderLevel(w, f"down_blocks.{i}", layers, heads, groups, exact_gelu)
                                  for i in range(levels)])
        self.mid = Middle(w, "mid_block", heads, groups, exact_gelu)
        self.dec = nn.ModuleList([DecoderLevel(w, f"up_blocks.{i}", layers + 1, heads, groups, exact_gelu)
                                  for i in range(levels)])
        self.out_norm, self.out_act = _group_norm(w, "conv_norm_out", groups, 1e-5), nn.SiLU()
        self.head = _conv(w, "conv_out")

    def forward(self, latents, t, context):
        emb = self.t_mlp(self.t_freq(t.reshape(-1).expand(latents.shape[0])).to(latents.dtype))
        x = self.stem(latents)
        skips = [x]
        for level in self.enc:
            x, level_skips = level(x, emb, context)
            skips.extend(level_skips)
        x = self.mid(x, emb, context)
        for level in self.dec:
            used = len(level.res)
            x = level(x, tuple(skips[-used:]), emb, context)
            del skips[-used:]
        return self.head(self.out_act(self.out_norm(x)))


# --- VAE decoder ----------------------------------------------------------------------------------------

class VaeAttention(nn.Module):
    def __init__(self, w: dict, key: str):
        super().__init__()
        self.norm = _group_norm(w, f"{key}.group_norm", 32, 1e-6)
        self.qkv = _linear(w, f"{key}.to_q", f"{key}.to_k", f"{key}.to_v")
        self.out = _linear(w, f"{key}.to_out.0")

    def forward(self, x):
        batch, channels, height, width = x.shape
        h = self.norm(x).reshape(batch, channels, height * width).transpose(1, 2)
        q, k, v = (t[:, None] for t in self.qkv(h).chunk(3, dim=-1))
        h = self.out(F.scaled_dot_product_attention(q, k, v)[:, 0])
        return h.transpose(1, 2).reshape(batch, channels, height, width) + x


class VaeMiddle(nn.Module):
    def __init__(self, w: dict, key: str):
        super().__init__()
        self.res_in, self.res_out = Res(w, f"{key}.resnets.0", 32, 1e-6), Res(w, f"{key}.resnets.1", 32, 1e-6)
        self.attn = VaeAttention(w, f"{key}.attentions.0")

    def forward(self, x):
        return self.res_out(self.attn(self.res_in(x)))


class VaeLevel(nn.Module):
    def __init__(self, w: dict, key: str, layers: int):
        super().__init__()
        self.res = nn.ModuleList([Res(w, f"{key}.resnets.{i}", 32, 1e-6) for i in range(layers)])
        self.up = Upsample(w, f"{key}.upsamplers.0.conv") if f"{key}.upsamplers.0.conv.weight" in w else None

    def forward(self, x):
        for res in self.res:
            x = res(x)
        return self.up(x) if self.up is not None else x


class VaeBody(nn.Module):
    def __init__(self, w: dict, config: dict):
        super().__init__()
        self.stem = _conv(w, "decoder.conv_in")
        self.mid = VaeMiddle(w, "decoder.mid_block")
        self.ups = nn.ModuleList([VaeLevel(w, f"decoder.up_blocks.{i}", config["layers_per_block"] + 1)
                                  for i in range(len(config["block_out_channels"]))])
        self.norm, self.act = _group_norm(w, "decoder.conv_norm_out", 32, 1e-6), nn.SiLU()
        self.head = _conv(w, "decoder.conv_out")

    def forward(self, z):
        x = self.mid(self.stem(z))
        for level in self.ups:
            x = level(x)
        return self.head(self.act(self.norm(x)))


class VaeDecoder(nn.Module):
    def __init__(self, w: dict, config: dict):
        super().__init__()
        self.pqc = _conv(w, "post_quant_conv")
        self.body = VaeBody(w, config)

    def forward(self, z):
        return self.body(self.pqc(z))


# --- the sampler: DDIM ("leading" spacing, eta 0), the port's own --------------------------------------

class DDIM:
    def __init__(self, config: dict, steps: int):
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                               dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final = torch.tensor(1.0) if config.get("set_alpha_to_one") else self.alphas_cumprod[0]
        self.stride = config["num_train_timesteps"] // steps
        leading = (np.arange(steps) * self.stride).round()[::-1]
        self.timesteps = [int(t) for t in leading + config.get("steps_offset", 0)]

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alphas_cumprod[t]
        previous = t - self.stride
        alpha_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final
        x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
        return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


# --- names: the port's module paths -> the reference's, for the block-level tensors -------------------

BLOCK_ARGUMENTS = {"x": "hidden_states", "emb": "temb", "context": "encoder_hidden_states",
                   "skips": "res_hidden_states_tuple"}
ROOT_ARGUMENTS = {"text_encoder": {"ids": "input_ids"}, "unet": {"latents": "sample", "t": "timestep",
                                                                 "context": "encoder_hidden_states"},
                  "vae_decoder": {"z": "z"}}


def arguments_for(component: str) -> dict[str, str]:
    """sd_parity.capture's argument map: "@arg" keys for the component itself, plain keys for blocks."""
    return {**BLOCK_ARGUMENTS, **{f"@{port}": ref for port, ref in ROOT_ARGUMENTS[component].items()}}


def names_for(component: str, model: nn.Module) -> dict[str, str]:
    """Port module path -> reference module path, for every module at the reference's block level."""
    if component == "text_encoder":
        layers = {f"stack.layers.{i}": f"encoder.layers.{i}" for i in range(len(model.stack.layers))}
        return {"embed": "embeddings", "stack": "encoder[last_hidden_state]", "ln_f": "final_layer_norm", **layers}
    if component == "unet":
        levels = {**{f"enc.{i}": f"down_blocks.{i}" for i in range(len(model.enc))},
                  **{f"dec.{i}": f"up_blocks.{i}" for i in range(len(model.dec))}}
        return {"stem": "conv_in", "t_freq": "time_proj", "t_mlp": "time_embedding", "mid": "mid_block",
                "out_norm": "conv_norm_out", "out_act": "conv_act", "head": "conv_out", **levels}
    levels = {f"body.ups.{i}": f"decoder.up_blocks.{i}" for i in range(len(model.body.ups))}
    return {"pqc": "post_quant_conv", "body": "decoder", "body.stem": "decoder.conv_in",
            "body.mid": "decoder.mid_block", "body.norm": "decoder.conv_norm_out", "body.act": "decoder.conv_act",
            "body.head": "decoder.conv_out", **levels}


# --- the candidate ----------------------------------------------------------------------------------------

class TorchPort(sd_parity.Candidate):
    """The port as an sd-parity candidate: free mode (its pipeline), isolated mode (blocks and stages)."""

    tensors = "blocks"

    def __init__(self, exact_gelu: bool = True):
        self.exact_gelu = exact_gelu
        self.name = "torch-port" if exact_gelu else "torch-port-tanh-gelu"
        self.facts = {"framework": f"torch {torch.__version__}"}

    def prepare(self, config, model_dir: Path) -> None:
        if config.pipeline != "txt2img" or config.scheduler != "ddim" or config.eta:
            raise sd_parity.BadInput(f"{self.name} implements txt2img with DDIM (eta 0) only")
        self.config, self.dtype = config, DTYPES[config.dtype]

        def load(part: str, file: str) -> tuple[dict, dict]:
            weights = {k: v.to(self.dtype) for k, v in load_file(str(model_dir / part / file)).items()}
            return weights, json.loads((model_dir / part / "config.json").read_text())

        clip_w, clip_config = load("text_encoder", "model.safetensors")
        unet_w, unet_config = load("unet", "diffusion_pytorch_model.safetensors")
        vae_w, vae_config = load("vae", "diffusion_pytorch_model.safetensors")
        self.models = {"text_encoder": TextEncoder(clip_w, clip_config).to(self.dtype).eval(),
                       "unet": UNet(unet_w, unet_config, self.exact_gelu).to(self.dtype).eval(),
                       "vae_decoder": VaeDecoder(vae_w, vae_config).to(self.dtype).eval()}
        self.models["unet"].t_freq.float()  # the sinusoids stay float32, as in SD
        self.scaling_factor = vae_config["scaling_factor"]
        self.scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        self.sampler = DDIM(self.scheduler_config, config.steps)
        self.names = {c: names_for(c, m) for c, m in self.models.items()}
        # hooks stay in place: they report into whichever run (free or isolated) is being captured
        self.hooks = [sd_parity.capture(m, c, names=self.names[c], arguments=arguments_for(c))
                      for c, m in self.models.items()]

    def fingerprint(self) -> str:
        return hashlib.sha256(Path(__file__).read_bytes() + str(self.exact_gelu).encode()).hexdigest()

    # --- free mode: the port's own pipeline --------------------------------------------------------
    def capture(self, run) -> None:
        tap = sd_parity.tap
        config, replay = run.config, run.replay
        guided = config.guidance > 1.0
        clip, unet, vae = (self.models[c] for c in ("text_encoder", "unet", "vae_decoder"))
        with torch.inference_mode():
            ids = self._token_ids(replay, config)
            tap("pipeline", "x_T", replay.x_T)
            tap("pipeline", "token_ids", ids)
            context = clip(ids)["last_hidden_state"]
            if guided:
                negative_ids = self._token_ids(replay, config, negative=True)
                tap("pipeline", "negative_token_ids", negative_ids)
                context = torch.cat([clip(negative_ids)["last_hidden_state"], context])
            latents = torch.from_numpy(replay.x_T).to(self.dtype)
            for step, t in enumerate(self.sampler.timesteps):
                model_input = torch.cat([latents, latents]) if guided else latents
                timestep = torch.tensor([t])
                tap("pipeline", "latent_model_input", model_input, step=step)
                tap("pipeline", "timestep", timestep, step=step)
                eps = unet(model_input, timestep, context)
                if guided:
                    uncond, text = eps.chunk(2)
                    tap("pipeline", "noise_pred_uncond", uncond, step=step)
                    tap("pipeline", "noise_pred_text", text, step=step)
                    eps = uncond + config.guidance * (text - uncond)
                tap("pipeline", "noise_pred", eps, step=step)
                latents = self.sampler.step(eps, t, latents)
                tap("pipeline", "step_output", latents, step=step)
                tap("pipeline", "latents", latents, step=step)
                run.progress(step + 1, len(self.sampler.timesteps))
            image = (vae(latents / self.scaling_factor) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
        tap("pipeline", "image", image)
        tap("pipeline", "image_uint8", (image * 255).round().astype(np.uint8))

    def _token_ids(self, replay, config, negative: bool = False) -> torch.Tensor:
        """The reference's token ids when replaying one, else the port's own tokenization (impl's BPE)."""
        ids = replay.token_ids(negative=negative)
        if ids is None:
            from sd_parity.impl.tokenizer import Tokenizer

            prompts = (config.negative_prompts() or [""] * len(config.prompts())) if negative else config.prompts()
            ids = Tokenizer.from_folder(config.model_dir() / "tokenizer")(prompts)
        return torch.from_numpy(np.asarray(ids))

    # --- isolated mode --------------------------------------------------------------------------
    def run_block(self, component, block, inputs, taps):
        if component not in self.models:
            raise NotImplementedError(component)
        model = self.models[component]
        port_path = next((p for p, name in self.names[component].items() if name == block), None)
        if block and port_path is None:
            raise NotImplementedError(block)
        given = sd_parity.unflatten_inputs(inputs)  # res_hidden_states_tuple[0], [1], ... -> one tuple
        rename = ROOT_ARGUMENTS[component] if block == "" else BLOCK_ARGUMENTS  # port -> reference
        arguments = {port: _tensor(given[ref], self.dtype) for port, ref in rename.items() if ref in given}
        with torch.inference_mode():
            return (model if block == "" else model.get_submodule(port_path))(**arguments)

    def run_stage(self, stage, inputs):
        t = self.sampler.timesteps[inputs.get("step", 0)]
        if stage == "model_input":
            latents = torch.from_numpy(inputs["latents"])
            model_input = torch.cat([latents, latents]) if inputs["guided"] else latents
            return {"latent_model_input": model_input, "timestep": torch.tensor([t])}
        if stage == "guidance":
            uncond, text = (torch.from_numpy(inputs[k]) for k in ("noise_pred_uncond", "noise_pred_text"))
            return {"noise_pred": uncond + inputs["guidance_scale"] * (text - uncond)}
        if stage == "sampler_step":
            return {"step_output": self.sampler.step(torch.from_numpy(inputs["noise_pred"]), t,
                                                     torch.from_numpy(inputs["latents"]))}
        if stage == "decode_input":
            return {"z": torch.from_numpy(inputs["latents"]) / self.scaling_factor}
        raise NotImplementedError(stage)


def _tensor(value, dtype):
    if isinstance(value, tuple):
        return tuple(_tensor(v, dtype) for v in value)
    tensor = torch.from_numpy(np.asarray(value))
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def make() -> TorchPort:
    return TorchPort()


def make_faulty() -> TorchPort:
    return TorchPort(exact_gelu=False)
