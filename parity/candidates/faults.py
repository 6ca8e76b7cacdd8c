"""Known porting bugs, injectable into impl/ one at a time, to prove the harness catches and locates them.

Each fault is bound to one module of a loaded model (found by its module path, the same path its taps
report under) or to one pipeline stage, and is applied by swapping that object's op set for one
with a single op changed. Nothing in impl/ is edited. `parity run --inject-fault NAME` and
`parity suite --inject-fault NAME` use them; tests/test_faults.py asserts each is detected and that
the first divergence (free mode) and the culprit (isolated mode) name the faulted module.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np

from sd_parity.errors import BadInput


class FaultyOps:
    """An op set with some ops replaced; everything else is the original's."""

    def __init__(self, ops, **replacements: Callable):
        self._ops = ops
        self._replacements = replacements

    def __getattr__(self, name: str):
        if name in self._replacements:
            return self._replacements[name]
        return getattr(self._ops, name)


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    where: tuple[tuple[str, str], ...]  # (component, module path or tensor name) the harness must name
    apply: Callable  # (sd) -> context manager
    families: tuple[str, ...] | None = None  # the model families it applies to (None: all); the first is tested

    @property
    def block(self):
        from sd_parity.runs.naming import block_of

        component, path = self.where[0]
        return block_of(component, path)

    def names(self, component: str, name: str) -> bool:
        """Whether a tensor (component, name) lies in the faulted module, or is the faulted tensor."""
        from sd_parity.runs.naming import module_path

        path = module_path(name)
        return any(component == c and (name == m or path == m or path.startswith(m + ".")) for c, m in self.where)


def modules(root) -> Iterator:
    """Every object under component `root` that has a scope (`.s`), breadth-first over attributes."""
    queue, seen = [root], set()
    while queue:
        obj = queue.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if getattr(obj, "s", None) is not None:
            yield obj
        children = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
        children += [getattr(obj, slot) for slot in getattr(type(obj), "__slots__", ()) if hasattr(obj, slot)]
        for child in children:
            items = child if isinstance(child, (list, tuple)) else [child]
            queue.extend(item for item in items if hasattr(item, "s") or isinstance(item, (list, tuple)))


def find_module(root, path: str):
    """The object under component `root` whose scope path is `path`."""
    for obj in modules(root):
        if getattr(obj.s, "path", None) == path:
            return obj
    raise LookupError(f"no module {path!r} in {type(root).__name__}")


@contextmanager
def swap_ops(obj, **replacements) -> Iterator[None]:
    """Give `obj` an op set with the named ops replaced (`make(original_ops)` builds each replacement)."""
    original = obj.ops
    obj.ops = FaultyOps(original, **{name: make(original) for name, make in replacements.items()})
    try:
        yield
    finally:
        obj.ops = original


def _on_module(component: str, path: str, **replacements):
    def apply(sd):
        return swap_ops(find_module(sd.models.component(component), path), **replacements)
    return apply


def _on_component(component: str, **replacements):
    def apply(sd):
        return swap_ops(sd.models.component(component), **replacements)
    return apply


@contextmanager
def _patched(obj, attribute: str, value) -> Iterator[None]:
    original = getattr(obj, attribute)
    setattr(obj, attribute, value)
    try:
        yield
    finally:
        setattr(obj, attribute, original)


def _host(ops, fn):
    """Run a NumPy function on backend arrays (faults need not be fast or exact, only wrong)."""
    def call(*args, **kwargs):
        host = (np.asarray(ops.to_numpy(a), dtype=np.float64) if ops.is_array(a) else a for a in args)
        return ops.asarray(fn(*host, **kwargs).astype(np.float32))
    return call


def _softmax_over_queries(q, k, v, scale=None, causal=False):
    scores = q @ np.swapaxes(k, -1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = np.exp(scores - scores.max(axis=-2, keepdims=True))
    return (scores / scores.sum(axis=-2, keepdims=True)) @ v


def _bilinear_2x(x, size=None):
    """torch's bilinear 2x upsampling (align_corners=False), one axis at a time."""
    for axis in (2, 3):
        previous = np.concatenate([np.take(x, [0], axis), np.delete(x, -1, axis)], axis)
        following = np.concatenate([np.delete(x, 0, axis), np.take(x, [-1], axis)], axis)
        even, odd = 0.75 * x + 0.25 * previous, 0.75 * x + 0.25 * following
        x = np.stack([even, odd], axis + 1).reshape(*x.shape[:axis], -1, *x.shape[axis + 1:])
    return x


def _shifted_sampler(make):
    def shifted(*args, **kwargs):
        sampler = make(*args, **kwargs)
        sampler.timesteps = sampler.timesteps + 1
        return sampler
    return shifted


UNET_NORM = "down_blocks.1.resnets.0.norm1"
UNET_SELF_ATTENTION = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
UNET_CROSS_ATTENTION = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
UNET_UPSAMPLER = "up_blocks.1.upsamplers.0"  # up_blocks.0 upsamples 1x1 maps at 64 px: any filter is nearest there
UNET_UP_BLOCK = "up_blocks.1"
UNET_LAYER_NORM = "down_blocks.2.attentions.0.transformer_blocks.0.norm1"
UNET_FF_OUT = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"


def _scaled_bias(component: str, path: str, factor: float):
    def apply(sd):
        module = find_module(sd.models.component(component), path)
        return _patched(module, "b", module.b * factor)
    return apply

FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault("groupnorm_eps", "GroupNorm eps 1e-2 instead of the config's 1e-5", (("unet", UNET_NORM),),
          _on_module("unet", UNET_NORM, group_norm=lambda ops: lambda x, g, w, b, eps: ops.group_norm(x, g, w, b, 1e-2))),
    Fault("groupnorm_groups", "GroupNorm over half the configured groups", (("unet", UNET_NORM),),
          _on_module("unet", UNET_NORM, group_norm=lambda ops: lambda x, g, w, b, eps: ops.group_norm(x, g // 2, w, b, eps))),
    Fault("attention_qk_swap", "self-attention with q and k swapped", (("unet", UNET_SELF_ATTENTION),),
          _on_module("unet", UNET_SELF_ATTENTION, attention=lambda ops: lambda q, k, v, **kw: ops.attention(k, q, v, **kw))),
    Fault("attention_no_scale", "attention scores not scaled by 1/sqrt(head_dim)", (("unet", UNET_CROSS_ATTENTION),),
          _on_module("unet", UNET_CROSS_ATTENTION, attention=lambda ops: lambda q, k, v, **kw: ops.attention(q, k, v, scale=1.0))),
    Fault("softmax_axis", "attention softmax over the query axis instead of the key axis",
          (("unet", UNET_SELF_ATTENTION),),
          _on_module("unet", UNET_SELF_ATTENTION, attention=lambda ops: _host(ops, _softmax_over_queries))),
    Fault("time_embedding_flip", "sinusoidal time embedding with sin and cos swapped", (("unet", "time_proj"),),
          _on_component("unet", timestep_embedding=lambda ops: lambda t, dim, flip, *a, **kw: ops.timestep_embedding(t, dim, not flip, *a, **kw))),
    Fault("upsample_bilinear", "bilinear instead of nearest 2x upsampling", (("unet", UNET_UPSAMPLER),),
          _on_module("unet", UNET_UPSAMPLER, upsample_nearest=lambda ops: _host(ops, _bilinear_2x))),
    Fault("skip_concat_order", "skip connection concatenated before the hidden states", (("unet", UNET_UP_BLOCK),),
          _on_module("unet", UNET_UP_BLOCK, cat=lambda ops: lambda xs, axis: ops.cat(list(xs)[::-1], axis))),
    Fault("timestep_off_by_one", "the sampler's timesteps shifted by one",
          (("unet", "@timestep"), ("pipeline", "timestep")),
          lambda sd: _patched(sd, "sampler", _shifted_sampler(sd.sampler))),
    Fault("vae_scaling_factor", "latents divided by 0.2 instead of the VAE's scaling factor", (("vae_decoder", "@z"),),
          lambda sd: _patched(sd.models.vae.config, "scaling_factor", 0.2)),
    Fault("guidance_swap", "classifier-free guidance with its halves swapped", (("pipeline", "noise_pred"),),
          lambda sd: _patched(sd, "guide", lambda uncond, text, scale: text + scale * (uncond - text))),
    Fault("layernorm_eps", "LayerNorm eps 1e-6 instead of the config's 1e-5 in one transformer block",
          (("unet", UNET_LAYER_NORM),),
          _on_module("unet", UNET_LAYER_NORM, layer_norm=lambda ops: lambda x, w, b, eps: ops.layer_norm(x, w, b, 1e-6))),
    Fault("linear_bias_1e-4", "one Linear's bias off by 1e-4 relative (a weight converted with a small error)",
          (("unet", UNET_FF_OUT),), _scaled_bias("unet", UNET_FF_OUT, 1 + 1e-4)),
    Fault("cfg_negative_twice", "the negative prompt's embedding used for both guidance halves",
          (("unet", "@encoder_hidden_states"),),
          lambda sd: _patched(sd, "cfg_batch", lambda negative, positive: sd.ops.cat([negative, negative], 0))),
    Fault("vae_scaling_twice", "latents divided by the VAE's scaling factor twice before decoding",
          (("vae_decoder", "@z"),),
          lambda sd: _patched(sd, "decode_input", lambda latents: latents / sd.models.vae.scaling_factor
                              / sd.models.vae.scaling_factor)),
]}


# --- Family faults: porting bugs of SD 2.x's and SDXL's conditioning and prediction type ----------------------

def _other_prediction(sd):
    """The sampler told the model predicts v when it predicts epsilon (and epsilon when it predicts v)."""
    current = sd.scheduler_config.get("prediction_type", "epsilon")
    swapped = "epsilon" if current == "v_prediction" else "v_prediction"
    return _patched(sd, "scheduler_config", {**sd.scheduler_config, "prediction_type": swapped})


def _conditioning(change: Callable):
    """The pipeline's conditioning (the family's Conditioner, sd_parity.impl.families) changed by `change`."""
    def apply(sd):
        return _patched(sd, "conditioning", change(sd.conditioning))
    return apply


def _last_layer(conditioning):
    return replace(conditioning, embedders=tuple(replace(e, hidden_layer=-1, final_norm=True)
                                                 for e in conditioning.embedders))


def _pooled_from_first(conditioning):
    first = conditioning.embedders[0].component
    return replace(conditioning, embedders=tuple(replace(e, pooled=e.component == first)
                                                 for e in conditioning.embedders))


def _time_ids_reordered(conditioning):
    """Crop before original size: (top, left, h, w, h, w) instead of (h, w, top, left, h, w). (Swapping
    original and target size would change nothing in a run where they are equal, the default.)"""
    order = ("crops_coords_top_left", "original_size", "target_size")
    return replace(conditioning, added=replace(conditioning.added, time_ids=order))


FAULTS.update({f.name: f for f in [
    Fault("epsilon_as_v", "the noise prediction read as v (v as epsilon, on a v-prediction model)",
          (("pipeline", "step_output"),), _other_prediction, families=("sdxl", "sd2", "sd1")),
    Fault("no_penultimate_layer", "the text encoders' last layer, final-normed, instead of the penultimate "
          "hidden states", (("unet", "@encoder_hidden_states"),), _conditioning(_last_layer), families=("sdxl",)),
    Fault("add_time_ids_order", "add_time_ids with the crop coordinates before the original size",
          (("pipeline", "add_time_ids"), ("unet", "@added_cond_kwargs[time_ids]")),
          _conditioning(_time_ids_reordered), families=("sdxl",)),
    Fault("pooled_wrong_encoder", "the pooled text embedding taken from the first text encoder, not the second",
          (("pipeline", "add_text_embeds"), ("unet", "@added_cond_kwargs[text_embeds]")),
          _conditioning(_pooled_from_first), families=("sdxl",)),
]})


def fault(name: str) -> Fault:
    if name not in FAULTS:
        raise BadInput(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    return FAULTS[name]
