"""The candidate protocol: what sd-parity needs from an implementation under test.

A candidate is any object with a `capture(run)` method (free mode) and, optionally, `run_block` and
`run_stage` (isolated mode), in the spirit of Polygraphy's runners: the harness owns the reference,
the run files, the isolation driver, the comparison and the reports; the candidate only computes.

    class MyPort(sd_parity.Candidate):
        name = "my-port"
        tensors = "blocks"                            # what it reports (a --capture SPEC)

        def capture(self, run):                       # free mode: the whole pipeline
            x_t = run.replay.x_T                      # the reference's initial noise
            with sd_parity.capture(self.unet, "unet", names=NAMES):   # torch hooks (or sd_parity.tap)
                latents = my_pipeline(x_t, run.replay.token_ids())
            sd_parity.tap("pipeline", "latents", latents, step=0)

        def run_block(self, component, block, inputs, taps):   # isolated mode (optional)
            return my_blocks[component, block](**inputs)       # reported as the block's output

`docs/ports.md` is the tutorial; `sd_parity.candidates.registry` resolves `--candidate NAME`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from sd_parity.runs.config import RunConfig
from sd_parity.runs.recorder import Recorder


class Replay(Protocol):
    """The reference's replayable inputs, so a candidate starts where the reference started.

    `x_T` is the initial noise (batch, C, H/8, W/8); `noise(kind, index, shape)` serves stochastic draws
    in order: kind "step" (the sampler's draw at denoising step `index`) or "posterior" (the VAE
    encoder's `index`-th posterior sample). `token_ids(negative=False, encoder=1)` are the reference's
    token ids (encoder=2: SDXL's second tokenizer's)."""

    x_T: np.ndarray

    def noise(self, kind: str, index: int, shape: tuple[int, ...]) -> np.ndarray: ...

    def token_ids(self, negative: bool = False, encoder: int = 1) -> np.ndarray | None: ...


class Taps(Protocol):
    """Where a candidate reports tensors inside a block run alone (module paths relative to the component)."""

    def output(self, path: str, value: Any) -> None: ...

    def inputs(self, path: str, args: dict[str, Any]) -> None: ...


@dataclass
class RunContext:
    """Everything a candidate's `capture` gets: what to run, where to report, what to replay."""

    config: RunConfig
    recorder: Recorder
    replay: Replay
    model_dir: Path
    progress: Callable[[int, int], None] = field(default=lambda step, total: None)
    metadata: dict[str, Any] = field(default_factory=dict)  # added to the run file's metadata after capture


class Candidate:
    """Base class for candidates (duck typing works too: only `capture` is required)."""

    name = "candidate"
    facts: dict[str, Any] = {}  # recorded in the run file's metadata (e.g. a version, a device)
    # The tensors the candidate reports, as a --capture SPEC ("blocks": component and block inputs and
    # outputs); `parity run` captures the reference to match. None: all the reference records.
    tensors: str | None = None

    def prepare(self, config: RunConfig, model_dir: Path) -> None:
        """Load what `config` needs (model folder `model_dir`, its dtype and device) before `capture`,
        `run_block` or `run_stage` are called for that run."""

    def capture(self, run: RunContext) -> None:
        """Free mode: run the pipeline `run.config` describes, reporting tensors to `run.recorder`."""
        raise NotImplementedError

    def run_block(self, component: str, block: str, inputs: dict[str, np.ndarray], taps: Taps) -> Any:
        """Isolated mode: run one block (`block` is a module path such as `down_blocks.1`; "" is the
        whole component) on the reference's captured inputs. Report inner tensors to `taps`; a return
        value is reported as the block's output. Raise NotImplementedError when blocks cannot run alone."""
        raise NotImplementedError

    def run_stage(self, stage: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Isolated mode for pipeline stages (see sd_parity.candidates.stages): the candidate's own glue
        code on the reference's inputs. Raise NotImplementedError for stages it cannot run alone."""
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """A string that changes whenever the candidate's results could (its code, its weights), so its
        runs can be cached; None (the default) means never cache."""
        return None

    def __repr__(self) -> str:
        return f"<candidate {self.name}>"


def supports(candidate: Any, method: str) -> bool:
    """Whether `candidate` overrides an optional method of the protocol."""
    implementation = getattr(type(candidate), method, None)
    return implementation is not None and implementation is not getattr(Candidate, method, None)
