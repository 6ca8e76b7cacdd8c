"""sd-parity: layer-by-layer parity for Stable Diffusion ports.

The public API (docs/ports.md):

    import sd_parity
    class MyPort(sd_parity.Candidate): ...          # a candidate: capture(run), optionally run_block/run_stage

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
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sd_parity' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
