"""The inputs a candidate replays so that it starts where the reference started.

From a reference run file: its x_T, token ids and recorded stochastic draws (sampler noise per step,
VAE posterior noise per encode), so a stochastic sampler lines up without matching torch's RNG.
Without a reference (a standalone capture): x_T from the fixture noise file and draws from NumPy's
PCG64 seeded per (seed, kind, index), as `impl` does on its own.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sd_parity.errors import BadInput
from sd_parity.impl.pipeline import seeded_noise
from sd_parity.runs.config import RunConfig
from sd_parity.runs.hdf5 import step_label
from sd_parity.runs.open import open_run
from sd_parity.runs.naming import with_call_index


class ReferenceReplay:
    """Replays a reference run file's x_T, token ids and recorded noise (public: sd_parity.ReferenceReplay).

        with sd_parity.ReferenceReplay("ref.h5") as replay:
            latents = replay.x_T                                  # (batch, 4, H/8, W/8) float32
            ids = replay.token_ids(), replay.token_ids(negative=True)
            noise = replay.noise("step", step, latents.shape)     # a stochastic sampler's draw at `step`

    `metadata` holds the reference's settings (model, prompt, steps, scheduler, guidance, seed, ...)."""

    def __init__(self, reference: str | os.PathLike):
        self.path = Path(reference)
        self._reader = open_run(self.path)
        if "pipeline/main/x_T" not in self._reader:
            self._reader.close()
            raise BadInput(f"{self.path} recorded no pipeline/main/x_T; capture the reference with sd-parity "
                           "(parity capture --candidate reference) so a candidate can replay it")
        self.metadata = dict(self._reader.metadata)
        self.x_T = self._reader.read("pipeline/main/x_T").astype(np.float32)

    def token_ids(self, negative: bool = False, encoder: int = 1) -> np.ndarray | None:
        """The token ids of text encoder `encoder` (SDXL's second: 2), of the negative prompt if asked."""
        name = ("negative_" if negative else "") + "token_ids" + (f"_{encoder}" if encoder > 1 else "")
        key = f"pipeline/main/{name}"
        return self._reader.read(key) if key in self._reader else None

    def noise(self, kind: str, index: int, shape: tuple[int, ...]) -> np.ndarray:
        key = (f"pipeline/{step_label(index)}/noise" if kind == "step"
               else f"pipeline/main/{with_call_index('posterior_noise', index)}")
        if key not in self._reader:
            raise BadInput(f"{self.path} recorded no {key}; capture the reference with the same sampler and pipeline")
        noise = self._reader.read(key).astype(np.float32)
        if noise.shape != tuple(shape):
            raise BadInput(f"recorded {key} has shape {noise.shape}, the candidate asks for {tuple(shape)}")
        return noise

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "ReferenceReplay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SeededReplay:
    """A standalone run's inputs: the fixture x_T file and seeded draws."""

    def __init__(self, config: RunConfig, latent_channels: int = 4, scale: int = 8):
        self.x_T = config.initial_noise(latent_channels=latent_channels, scale=scale)
        self.noise = seeded_noise(config.seed)

    def token_ids(self, negative: bool = False, encoder: int = 1) -> None:
        return None

    def close(self) -> None:
        pass
