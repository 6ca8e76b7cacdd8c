"""Where captured tensors go, and which run is being captured right now.

A sink takes (component, name, value) reports from hooks and taps: a RecorderSink writes them into a
run file through a Recorder (the reference, a candidate's free run, a `sd_parity.writer`); a TapsSink
forwards them to the taps of one block run alone (isolated mode), whose invocation the driver owns.

The active sink is a context variable: the drivers set it around `Candidate.capture` and
`Candidate.run_block`, and `sd_parity.writer` inside its `with` block, so `sd_parity.capture`,
`sd_parity.tap` and `sd_parity.wrap` report to the right run without being handed one.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

import numpy as np

from sd_parity.errors import BadInput
from sd_parity.runs.recorder import Recorder


class RecorderSink:
    """Reports into a run file through `recorder`; each invocation of a component is opened here."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def active(self, component: str) -> bool:
        return self.recorder.active(component)

    def is_open(self, component: str) -> bool:
        return self.recorder.is_open(component)

    def begin(self, component: str, label: str | None = None) -> None:
        self.recorder.begin_invocation(component, label)

    def end(self, component: str) -> None:
        self.recorder.end_invocation(component)

    def output(self, component: str, path: str, value: Any) -> None:
        self.recorder.module_output(component, path, value)

    def inputs(self, component: str, path: str, arguments: dict[str, Any]) -> None:
        self.recorder.module_inputs(component, path, arguments)

    def pipeline(self, name: str, value: Any, step: int | None = None) -> None:
        self.recorder.pipeline(name, value, step=step)


class TapsSink:
    """Reports into the taps of one block run alone (isolated mode): the driver opened the invocation,
    and only the tensors of the taps' component are kept (pipeline tensors come from the stages)."""

    def __init__(self, taps: Any, component: str | None = None):
        self.taps = taps
        self.component = component if component is not None else getattr(taps, "component", None)

    def active(self, component: str) -> bool:
        return self.component is None or component == self.component

    def is_open(self, component: str) -> bool:
        return True

    def begin(self, component: str, label: str | None = None) -> None:
        pass

    def end(self, component: str) -> None:
        pass

    def output(self, component: str, path: str, value: Any) -> None:
        if self.active(component):
            self.taps.output(path, value)

    def inputs(self, component: str, path: str, arguments: dict[str, Any]) -> None:
        if self.active(component):
            self.taps.inputs(path, arguments)

    def pipeline(self, name: str, value: Any, step: int | None = None) -> None:
        pass


_ACTIVE: ContextVar[RecorderSink | TapsSink | None] = ContextVar("sd_parity_active_sink", default=None)


@contextmanager
def activated(sink: RecorderSink | TapsSink) -> Iterator[RecorderSink | TapsSink]:
    """Make `sink` the one that `capture`, `tap` and `wrap` report to, for the duration of the block."""
    token = _ACTIVE.set(sink)
    try:
        yield sink
    finally:
        _ACTIVE.reset(token)


def active_sink() -> RecorderSink | TapsSink | None:
    return _ACTIVE.get()


def sink_for(target: Any) -> RecorderSink | TapsSink:
    """A sink for what a user hands `capture(..., into=...)`: a Recorder, anything holding one (a
    RunContext, a writer), a sink, or a block's taps (output/inputs methods)."""
    if isinstance(target, (RecorderSink, TapsSink)):
        return target
    if isinstance(target, Recorder):
        return RecorderSink(target)
    if isinstance(getattr(target, "recorder", None), Recorder):
        return RecorderSink(target.recorder)
    if callable(getattr(target, "output", None)) and callable(getattr(target, "inputs", None)):
        return TapsSink(target)
    raise BadInput(f"cannot capture into {type(target).__name__}: give a run (RunContext, sd_parity.writer), "
                   "a Recorder or a block's taps")


def component_output(value: Any) -> Any:
    """A component's own output, which is named by its fields: a bare array is field 0 (`0`), as the
    reference's UNet and VAE return their outputs (tuples)."""
    return (value,) if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor" else value


def host_values(value: Any) -> Any:
    """`value` with every array leaf as a NumPy array or torch tensor (the two the recorder stores):
    JAX, MLX and tinygrad arrays, and Python numbers, are copied to host NumPy arrays."""
    if isinstance(value, np.ndarray) or type(value).__module__.split(".", 1)[0] == "torch":
        return value
    if isinstance(value, dict) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {key: host_values(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(host_values(item) for item in value)
    if value is None or isinstance(value, str):
        return value
    to_numpy = getattr(value, "numpy", None)  # tinygrad, and torch-like tensors of other libraries
    array = to_numpy() if callable(to_numpy) else np.asarray(value)
    if not isinstance(array, np.ndarray) or array.dtype == object:
        raise BadInput(f"cannot store a {type(value).__name__} as a tensor: tap NumPy arrays, torch tensors or "
                       "arrays that numpy.asarray converts (JAX, MLX, tinygrad)")
    return array
