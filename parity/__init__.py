"""sd-parity: layer-by-layer parity for Stable Diffusion ports.

The public API (docs/ports.md):

    import sd_parity
    class MyPort(sd_parity.Candidate): ...          # a candidate: capture(run), optionally run_block/run_stage
    sd_parity.capture(module, "unet", names=...)    # torch forward hooks on a port's nn.Module
    sd_parity.tap("pipeline", "latents", x, step=i) # any framework: tap, tap_inputs, wrap, invocation
    sd_parity.writer("cand.h5", reference="ref.h5") # a run file written from Python (atomic)
    sd_parity.ReferenceReplay("ref.h5")             # the reference's x_T, token ids, recorded noise
    sd_parity.reference_run("tiny-sd1", steps=2)    # a cached reference run; run_candidate, assert_parity

The package's rooms follow the flow of a check: runs/ (the run-file format, capture) ->
candidates/ (implementations under test, free and isolated) -> judging/ (compare, tolerances,
verdicts) -> reports/ (summary.json, junit.xml, HTML) -> cli/ (the `parity` command); cases/ ties
them together for `parity run`. impl/ (sd_parity.impl) is the clean-room SD, reference/
(sd_parity.reference) the diffusers side, fixtures/ (sd_parity.fixtures) the embedded models.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sd-parity")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public names, imported on first use so that `import sd_parity` stays light (no torch, no h5py).
_EXPORTS = {
    "Candidate": "sd_parity.candidates.protocol",
    "RunContext": "sd_parity.candidates.protocol",
    "RunConfig": "sd_parity.runs.config",
    "capture": "sd_parity.candidates.hooks",
    "tap": "sd_parity.candidates.tap",
    "tap_inputs": "sd_parity.candidates.tap",
    "wrap": "sd_parity.candidates.tap",
    "invocation": "sd_parity.candidates.tap",
    "writer": "sd_parity.candidates.tap",
    "Writer": "sd_parity.candidates.tap",
    "ReferenceReplay": "sd_parity.candidates.replay",
    "unflatten_inputs": "sd_parity.impl.scope",
    "reference_run": "sd_parity.testing",
    "Reference": "sd_parity.testing",
    "run_candidate": "sd_parity.testing",
    "assert_parity": "sd_parity.testing",
    "NotAtParity": "sd_parity.testing",
    "SdParityError": "sd_parity.errors",
    "BadInput": "sd_parity.errors",
    "MissingExtra": "sd_parity.errors",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sd_parity' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
