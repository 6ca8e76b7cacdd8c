"""Drives any candidate into a run file: free mode (its whole pipeline) and isolated mode (each block
and pipeline stage on the reference's captured inputs), the same way for `impl/` and for a port."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sd_parity.progress import step_progress
from sd_parity.runs.config import RunConfig, run_metadata, unet_parameter_count
from sd_parity.runs.hdf5 import Entry, RunReader, RunWriter
from sd_parity.runs.open import open_run
from sd_parity.runs.naming import block_of, is_block
from sd_parity.runs.recorder import Recorder
from sd_parity.runs.selection import MODULE_COMPONENTS, CaptureSpec

from .protocol import Candidate, RunContext, supports
from .replay import ReferenceReplay, SeededReplay
from .sinks import RecorderSink, TapsSink, activated
from .stages import isolate_pipeline_stages

WRITE_QUEUE_BYTES = 256 << 20


def prepare(candidate: Any, config: RunConfig) -> Path:
    """Load the candidate for `config` (if it has a `prepare`) and return the model folder."""
    model_dir = config.model_dir()
    if hasattr(candidate, "prepare"):
        candidate.prepare(config, model_dir)
    return model_dir


def scheduler_config(model_dir: Path) -> dict:
    path = model_dir / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def latent_geometry(model_dir: Path) -> tuple[int, int]:
    """(latent channels, VAE downsampling factor) of a diffusers model folder."""
    path = model_dir / "vae" / "config.json"
    vae = json.loads(path.read_text()) if path.is_file() else {}
    return int(vae.get("latent_channels", 4)), 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def run_free(candidate: Any, config: RunConfig, output: Path, reference: Path | None = None,
             progress: bool = False, make_writer: Callable[[Path, dict], Any] | None = None) -> Path:
    """The candidate's whole pipeline for `config`, replaying `reference`'s inputs (or seeded ones).

    `make_writer(output, metadata)` makes what the tensors stream into (default: a RunWriter; a live
    comparison passes a LiveCompare, sd_parity.judging.live)."""
    model_dir = prepare(candidate, config)
    channels, scale = latent_geometry(model_dir)
    replay = ReferenceReplay(reference) if reference is not None else SeededReplay(config, channels, scale)
    try:
        spec = CaptureSpec.parse(config.capture_spec(unet_parameter_count(model_dir)))
        metadata = {**run_metadata(config, impl=candidate_name(candidate), model_dir=model_dir, x_t=replay.x_T,
                                   scheduler_config=scheduler_config(model_dir)), **candidate_facts(candidate)}
        make = make_writer or (lambda path, meta: RunWriter(path, meta, compression=config.compression,
                                                       background_bytes=WRITE_QUEUE_BYTES))
        with make(output, metadata) as writer:
            recorder = Recorder(writer, spec, total_steps=config.steps)
            label = f"{candidate_name(candidate)} {config.dtype}"
            run = RunContext(config, recorder, replay, model_dir, progress=step_progress(progress, config.steps, label))
            with activated(RecorderSink(recorder)):  # sd_parity.capture/tap/wrap report into this run
                candidate.capture(run)
            if run.metadata:
                writer.update_metadata(**run.metadata)
    finally:
        replay.close()
    return output


def run_isolated(candidate: Any, config: RunConfig, reference: Path, output: Path) -> Path:
    """Every block, component and pipeline stage of the reference re-run by the candidate on the
    reference's inputs, so each tensor's error is the block's own, not inherited."""
    if not (supports(candidate, "run_block") or supports(candidate, "run_stage")):
        raise NotImplementedError(f"{candidate_name(candidate)} runs neither blocks nor stages alone")
    model_dir = prepare(candidate, config)
    with open_run(reference) as ref:
        metadata = {**run_metadata(config, impl=candidate_name(candidate), model_dir=model_dir,
                                   x_t=ref.read("pipeline/main/x_T"), scheduler_config=scheduler_config(model_dir),
                                   mode="isolated"), **candidate_facts(candidate)}
        with RunWriter(output, metadata, compression=config.compression,
                       background_bytes=WRITE_QUEUE_BYTES) as writer:
            # what the reference keeps is what can be compared (block inputs included, for the isolation check)
            spec = CaptureSpec.parse(config.capture_spec(unet_parameter_count(model_dir)))
            recorder = Recorder(writer, spec, total_steps=config.steps)
            if supports(candidate, "run_block"):
                _isolate_blocks(candidate, ref, recorder)
            if supports(candidate, "run_stage"):
                isolate_pipeline_stages(candidate, ref, recorder, config)
    return output


def candidate_name(candidate: Any) -> str:
    return str(getattr(candidate, "name", type(candidate).__name__))


def candidate_facts(candidate: Any) -> dict[str, Any]:
    """What the candidate says about itself for the run file's metadata (its `facts` mapping, if any)."""
    return dict(getattr(candidate, "facts", None) or {})


class ComponentTaps:
    """Forwards taps (module paths within `component`) to the recorder, remembering what was reported.

    `outside_blocks` keeps only tensors outside every block: the whole-component pass of an isolated
    run, whose block tensors come from the block-by-block passes."""

    def __init__(self, recorder: Recorder, component: str, outside_blocks: bool = False):
        self.recorder, self.component, self.outside_blocks = recorder, component, outside_blocks
        self.reported: set[str] = set()

    def output(self, path: str, value: Any) -> None:
        if not self.outside_blocks or block_of(self.component, path) is None:
            self.reported.add(path)
            self.recorder.module_output(self.component, path, value)

    def inputs(self, path: str, args: dict[str, Any]) -> None:
        if not self.outside_blocks:
            self.recorder.module_inputs(self.component, path, args)


def _isolate_blocks(candidate: Any, ref: RunReader, recorder: Recorder) -> None:
    by_invocation: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for entry in ref.entries():
        by_invocation[(entry.component, entry.invocation)].append(entry)
    for component in (c for c in MODULE_COMPONENTS if c in ref.components()):
        for invocation in ref.invocations(component):
            entries = by_invocation[(component, invocation)]
            with recorder.invocation(component, invocation):
                for block in blocks_with_inputs(component, entries):
                    inputs = inputs_of(ref, entries, block)
                    taps = ComponentTaps(recorder, component, outside_blocks=block == "")
                    try:
                        with activated(TapsSink(taps)):
                            result = candidate.run_block(component, block, inputs, taps)
                    except NotImplementedError:
                        continue  # the candidate cannot run this block alone: its tensors are missing
                    if result is not None and block and block not in taps.reported:
                        recorder.module_output(component, block, result)


def blocks_with_inputs(component: str, entries: list[Entry]) -> list[str]:
    """The component itself ("") and each block whose inputs the reference captured, in execution order."""
    blocks: dict[str, None] = {}
    for entry in sorted(entries, key=lambda e: e.order):
        if "@" not in entry.name:
            continue
        path = entry.name.split("@", 1)[0]
        if "#" not in path and (path == "" or is_block(component, path)):
            blocks.setdefault(path, None)
    return list(blocks)


def block_inputs(entries: list[Entry], block: str) -> list[Entry]:
    """The captured `block@argument` tensors of the block's first call among `entries`."""
    prefix = f"{block}@"
    return [e for e in entries if e.name.startswith(prefix) and "#" not in e.name[len(prefix):]]


def inputs_of(ref: RunReader, entries: list[Entry], block: str) -> dict[str, np.ndarray]:
    """The block's inputs, keyed by `argument` (flattened names kept)."""
    return {e.name[len(block) + 1:]: ref.read(e, restore_layout=True) for e in block_inputs(entries, block)}


__all__ = ["Candidate", "run_free", "run_isolated"]
