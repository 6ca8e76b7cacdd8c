"""One diffusers UNet call on a model folder, plain or with every module output captured to a run file.

Run as a script in a fresh process so its peak RSS belongs to that one configuration:
    python -m tests.benchmarks.unet_call MODEL_DIR --latent 64 --batch 2 [--capture OUT.h5] [--repeat N]
Prints one JSON line: seconds per call (best of --repeat), peak RSS, weight bytes, largest activation.
"""
import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--capture", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--queue-mib", type=int, default=192, help="background write queue; 0 writes inline")
    parser.add_argument("--keep", action="store_true", help="keep the run files (for the compare benchmark)")
    parser.add_argument("--live", type=Path, default=None, metavar="REF.h5",
                        help="compare every module output live against this reference run (judging.live) "
                             "instead of capturing; --capture names the run file of kept tensors")
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel

    from sd_parity.runs.selection import CaptureSpec
    from sd_parity.runs.recorder import Recorder
    from sd_parity.runs.hdf5 import RunWriter
    from sd_parity.candidates.hooks import hook_module
    from sd_parity.candidates.sinks import RecorderSink

    from .networks import peak_rss

    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(args.model_dir / "unet", local_files_only=True).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.standard_normal((args.batch, 4, args.latent, args.latent), dtype=np.float32))
    context = torch.from_numpy(
        rng.standard_normal((args.batch, 77, unet.config.cross_attention_dim), dtype=np.float32))
    timestep = torch.tensor([500])
    unet(sample, timestep, context)  # warm-up: first-call allocations and kernel selection
    baseline_rss = peak_rss()

    if args.live:
        print(json.dumps(_live(unet, (sample, timestep, context), args)))
        return
    timings, largest, written = [], 0, 0
    for repeat in range(args.repeat):
        writer = RunWriter(args.capture.with_suffix(f".{repeat}.h5"), {}, background_bytes=args.queue_mib << 20) \
            if args.capture else None
        recorder = Recorder(writer, CaptureSpec.parse("all"), total_steps=1) if writer else None
        hooks = hook_module(unet, "unet", RecorderSink(recorder)) if writer else nullcontext()
        with hooks:
            started = time.perf_counter()
            unet(sample, timestep, context)
            if writer:
                writer.close()
            timings.append(time.perf_counter() - started)
        if writer:
            written = writer.bytes_written
            with __import__("h5py").File(writer.path) as file:
                largest = max(ds.nbytes for ds in _datasets(file))
            if not args.keep:
                writer.path.unlink()
    print(json.dumps({"seconds": min(timings), "timings": timings, "peak_rss": peak_rss(), "rss_after_warmup": baseline_rss, "weight_bytes": weight_bytes,
        "largest_activation": largest, "captured_bytes": written}))


def _live(unet, inputs, args) -> dict:
    """Best of --repeat: one call compared live against --live, then its comparison; bytes kept vs produced."""
    from sd_parity.candidates.hooks import hook_module
    from sd_parity.candidates.sinks import RecorderSink
    from sd_parity.judging.compare import compare_runs
    from sd_parity.judging.live import LiveCompare
    from sd_parity.runs.recorder import Recorder
    from sd_parity.runs.selection import CaptureSpec

    from .networks import peak_rss

    best = None
    for repeat in range(args.repeat):
        kept = args.capture.with_suffix(f".live{repeat}.h5")
        started = time.perf_counter()
        live = LiveCompare(kept, {}, args.live)
        with hook_module(unet, "unet", RecorderSink(Recorder(live, CaptureSpec.parse("all"), total_steps=1))):
            unet(*inputs)
        called = time.perf_counter() - started
        with live.close() as run:
            comparison = compare_runs(args.live, run)
        seconds = time.perf_counter() - started
        measured = {"seconds": seconds, "call_and_metrics_seconds": called, "bytes_written": live.bytes_written,
                    "tensor_bytes": live.tensor_bytes, "tensors": len(comparison.results),
                    "passed": comparison.first_divergence() is None}
        kept.unlink()
        best = measured if best is None or seconds < best["seconds"] else best
    return {**best, "peak_rss": peak_rss()}


def _datasets(file):
    found = []
    file.visititems(lambda name, obj: found.append(obj) if hasattr(obj, "shape") else None)
    return found


if __name__ == "__main__":
    main()
