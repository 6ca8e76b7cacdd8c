"""The three networks of each implementation as zero-argument callables over fixed inputs.

Used by the benchmarks in-process (timings) and as a script in a fresh process (peak memory):
    python -m tests.benchmarks.networks MODEL_DIR IMPL COMPONENT LATENT [BATCH [THREADS]]
prints JSON: seconds (wall and CPU) of one call after a warm-up, peak RSS, RSS after loading. THREADS sets torch's
intra-op threads and the NumPy backend's worker threads (default: each library's own choice).
An SDXL UNet (addition_embed_type text_time) also gets its added conditions (pooled text embeds, time ids).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

IMPLS = ("diffusers", "torch", "numpy")
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def inputs(config: dict, component: str, latent: int, batch: int) -> tuple:
    rng = np.random.default_rng(0)
    if component == "text_encoder":
        return (rng.integers(0, 49407, (batch, 77)).astype(np.int64),)
    if component == "unet":
        sample = rng.standard_normal((batch, config["in_channels"], latent, latent)).astype(np.float32)
        context = rng.standard_normal((batch, 77, config["cross_attention_dim"])).astype(np.float32)
        if config.get("addition_embed_type") != "text_time":
            return sample, np.array([500], np.int64), context
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((batch, pooled)).astype(np.float32),
                 "time_ids": np.tile(np.array([[8.0 * latent] * 2 + [0.0] * 2 + [8.0 * latent] * 2], np.float32),
                                     (batch, 1))}
        return sample, np.array([500], np.int64), context, added
    return (rng.standard_normal((1, 4, latent, latent)).astype(np.float32),)


def network(model_dir: Path, impl: str, component: str, latent: int, batch: int = 2, threads: int | None = None):
    """(call, weight_bytes): a callable running one forward pass of `component` with `impl`."""
    part = "vae" if component == "vae_decoder" else component
    config = json.loads((model_dir / part / "config.json").read_text())
    args = inputs(config, component, latent, batch)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if impl == "diffusers":
        return _diffusers(model_dir, component, args)
    from sd_parity.impl.models import load_text_encoder, load_unet, load_vae
    from sd_parity.impl.ops import get_ops

    ops = get_ops(impl, "fp32", **({"threads": threads} if impl == "numpy" and threads is not None else {}))
    if component == "text_encoder":
        model = load_text_encoder(model_dir, ops)
        return (lambda: model.encode(args[0])), _weight_bytes(model_dir / part)
    if component == "unet":
        model = load_unet(model_dir, ops)
        return (lambda: model(*args)), _weight_bytes(model_dir / part)
    model = load_vae(model_dir, ops, parts=("decoder",))
    return (lambda: model.decode(args[0])), _weight_bytes(model_dir / part)


def _diffusers(model_dir: Path, component: str, args: tuple):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.set_grad_enabled(False)
    tensors = [torch.from_numpy(a) for a in args[:3]]
    added = {k: torch.from_numpy(v) for k, v in args[3].items()} if len(args) > 3 else None
    if component == "text_encoder":
        model = CLIPTextModel.from_pretrained(model_dir / "text_encoder", local_files_only=True).eval()
        call = lambda: model(tensors[0])[0]  # noqa: E731
    elif component == "unet":
        model = UNet2DConditionModel.from_pretrained(model_dir / "unet", local_files_only=True).eval()
        call = lambda: model(*tensors, added_cond_kwargs=added).sample  # noqa: E731
    else:
        model = AutoencoderKL.from_pretrained(model_dir / "vae", local_files_only=True).eval()
        call = lambda: model.decode(tensors[0]).sample  # noqa: E731
    return call, sum(p.numel() * p.element_size() for p in model.parameters())


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child of a big pytest process would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    model_dir, impl, component, latent = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else None
    call, weights = network(model_dir, impl, component, latent, batch, threads)
    loaded = peak_rss()
    call()
    started, cpu_started = time.perf_counter(), time.process_time()
    call()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss": peak_rss(),
                      "rss_after_load": loaded, "weight_bytes": weights}))


if __name__ == "__main__":
    main()
