"""Candidates: the implementations under test, behind one protocol (protocol.py).

impl/'s backends are candidates like any port (impl.py); registry.py resolves `--candidate SPEC`;
runner.py drives a candidate in free and isolated mode; replay.py serves the reference's inputs;
stages.py lists the pipeline stages of isolated mode; faults.py injects known bugs into impl/.
How a candidate reports tensors: hooks.py (torch forward hooks on any nn.Module, the reference's
too), tap.py (tap/wrap/writer for any framework), sinks.py (where reports go, and the active run).
"""
from .protocol import Candidate, Replay, RunContext, Taps

__all__ = ["Candidate", "Replay", "RunContext", "Taps"]
