"""Activation statistics of a reference run, where numerics depend on them (docs/stress.md's table).

    .venv/bin/python tests/stress_statistics.py tiny-sd1 tiny-sd1-stress

prints, per fixture, what the stress fixtures are shaped for: the smallest group variance at the input
of the two eps-sensitive GroupNorms, the largest self-attention logit, the largest VAE decoder
activation, and the dynamic range of the UNet and text encoder residual streams (largest channel RMS /
median channel RMS).
"""
from __future__ import annotations

import sys

import numpy as np

from sd_parity.runs.open import open_run

UNET_NORM_INPUT = "down_blocks.1.resnets.0"  # what down_blocks.1.attentions.0.norm normalises
VAE_NORM_INPUT = "decoder.up_blocks.1.resnets.0.conv1"  # what decoder.up_blocks.1.resnets.0.norm2 normalises
UNET_STREAM = "down_blocks.1.resnets.1"


def group_variances(x: np.ndarray, groups: int) -> np.ndarray:
    """Variance of each (image, group) of an NCHW tensor, as GroupNorm computes it."""
    n, c = x.shape[:2]
    return x.astype(np.float64).reshape(n, groups, -1).var(axis=-1)


def channel_range(x: np.ndarray, axis: int) -> float:
    """Largest channel RMS over the median channel RMS (`axis` is the channel axis)."""
    moved = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    rms = np.sqrt(np.square(moved).mean(axis=1))
    return float(rms.max() / np.median(rms))


def attention_logits(q: np.ndarray, k: np.ndarray, heads: int) -> float:
    """The largest |q.k| / sqrt(head_dim) of one attention's (batch, tokens, inner) projections."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.astype(np.float64).reshape(b, n, heads, d).transpose(0, 2, 1, 3)
    kh = k.astype(np.float64).reshape(b, -1, heads, d).transpose(0, 2, 1, 3)
    return float(np.abs(qh @ kh.transpose(0, 1, 3, 2)).max() / np.sqrt(d))


def statistics(run_path, unet_groups: int, vae_groups: int, heads: int) -> dict[str, float]:
    """The statistics over every step and call of a reference run captured with --capture all."""
    with open_run(run_path) as run:
        keys = {e.key for e in run.entries()}

        def each(component: str, name: str):
            return [run.read(f"{component}/{inv}/{name}") for inv in run.invocations(component)
                    if f"{component}/{inv}/{name}" in keys]

        unet_input = [group_variances(x, unet_groups) for x in each("unet", UNET_NORM_INPUT)]
        vae_input = [group_variances(x, vae_groups) for x in each("vae_decoder", VAE_NORM_INPUT)]
        logits = [attention_logits(run.read(key), run.read(key[:-len("to_q")] + "to_k"), heads)
                  for key in sorted(keys) if key.startswith("unet/") and key.endswith("attn1.to_q")]
        vae_max = max(float(np.abs(run.read(key).astype(np.float64)).max())
                      for key in keys if key.startswith("vae_decoder/") and "@" not in key)
        return {
            "unet_norm_min_group_var": float(min(v.min() for v in unet_input)),
            "unet_norm_smallest_group_max_var": float(max(v[:, -1].max() for v in unet_input)),
            "unet_norm_median_group_var": float(np.median(np.concatenate(unet_input, axis=None))),
            "vae_norm_min_group_var": float(min(v.min() for v in vae_input)),
            "vae_norm_smallest_group_max_var": float(max(v[:, -1].max() for v in vae_input)),
            "vae_norm_median_group_var": float(np.median(np.concatenate(vae_input, axis=None))),
            "max_self_attention_logit": max(logits),
            "vae_decoder_max_abs": vae_max,
            "unet_stream_channel_range": max(channel_range(x, 1) for x in each("unet", UNET_STREAM)),
            "text_stream_channel_range": max(channel_range(x, -1) for x in each("text_encoder", "encoder.layers.1")),
        }


def main(names: list[str]) -> None:
    import json

    from sd_parity.cases.case import reference_run
    from sd_parity.runs.config import RunConfig

    for name in names:
        config = RunConfig(model=name, steps=3, prompt="a photograph of an astronaut riding a horse",
                           negative_prompt="blurry", capture="all")
        folder = config.model_dir()
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        heads = unet["attention_head_dim"]
        stats = statistics(reference_run(config), unet["norm_num_groups"], vae["norm_num_groups"],
                           heads[1] if isinstance(heads, list) else heads)
        print(name, json.dumps({k: float(f"{v:.3g}") for k, v in stats.items()}))


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny-sd1", "tiny-sd1-stress"])
