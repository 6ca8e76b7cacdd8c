"""The capture side of a run: names, selects and streams tensors into a run file.

Shared by every implementation that writes run files from Python (the diffusers reference and impl/):
they report (component, module path, value) and the recorder applies the naming rules of
parity.naming, the capture selection, the current invocation and the writer.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from .selection import CaptureSpec
from .naming import flatten, with_call_index
from .hdf5 import RunWriter, call_label, step_label


def _is_tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray) or type(value).__name__ == "Tensor"


def layout_of(value: Any) -> str | None:
    """channels_last for a torch tensor that torch's kernels treat as channels-last (and is not contiguous).

    Only torch picks kernels by memory layout; NumPy arrays carry no such meaning. torch's own rule is
    used, since a batch-1 tensor can have channels-last strides yet count as contiguous to its kernels."""
    if isinstance(value, np.ndarray) or getattr(value, "ndim", 0) != 4:
        return None
    import torch
    from torch._prims_common import suggest_memory_format

    if value.is_contiguous() or suggest_memory_format(value) != torch.channels_last:
        return None
    return "channels_last"


def to_numpy(value: Any) -> np.ndarray:
    """A host NumPy array for a NumPy array or torch tensor (bfloat16 kept as ml_dtypes.bfloat16)."""
    if isinstance(value, np.ndarray):
        return value
    import torch

    tensor = value.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.cpu().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.cpu().contiguous().numpy()


class Recorder:
    """Routes captured values into a RunWriter under the current invocation of each component."""

    def __init__(self, writer: RunWriter, spec: CaptureSpec, total_steps: int):
        self.writer = writer
        self.spec = spec
        self.total_steps = total_steps
        self._invocation: dict[str, str | None] = {}
        self._invocation_count: dict[str, int] = defaultdict(int)
        self._calls: dict[str, int] = defaultdict(int)
        self.step = -1  # the denoising step the pipeline is in; -1 before the loop
        self.offered = self.kept = 0  # module tensors produced, and kept by the selection
        self._example: str | None = None
        spec.check_steps(total_steps)
        checks = getattr(writer, "before_close", None)  # RunWriter's; test doubles may lack it
        if checks is not None:
            checks.append(lambda: spec.check_selected(self.offered, self.kept, self._example))

    def begin_invocation(self, component: str, label: str | None = None) -> str:
        """Start the next invocation of `component`: call_N, or step_NNN for the UNet (or `label`)."""
        index = self._invocation_count[component]
        self._invocation_count[component] += 1
        if label is not None:
            index = int(label.rsplit("_", 1)[1])
        label = step_label(index) if component == "unet" else call_label(index)
        capture = self.spec.wants_component(component) and (
            component != "unet" or self.spec.wants_step(index, self.total_steps))
        self._invocation[component] = label if capture else None
        self._calls = defaultdict(int)
        return label

    def end_invocation(self, component: str) -> None:
        self._invocation.pop(component, None)

    @contextmanager
    def invocation(self, component: str, label: str | None = None) -> Iterator[str]:
        label = self.begin_invocation(component, label)
        try:
            yield label
        finally:
            self.end_invocation(component)

    def active(self, component: str) -> bool:
        return self._invocation.get(component) is not None

    def current_invocation(self, component: str) -> str | None:
        """The label (call_N, step_NNN) of the invocation of `component` being recorded, if any."""
        return self._invocation.get(component)
    def is_open(self, component: str) -> bool:
        """Whether an invocation of `component` is open (captured or not, by the capture selection)."""
        return component in self._invocation

    def module_output(self, component: str, path: str, value: Any) -> None:
        """One call of the module at `path`; repeated calls within an invocation get #k suffixes."""
        invocation = self._invocation.get(component)
        if invocation is None:
            return
        call = self._calls[f"{component}:{path}"]
        self._calls[f"{component}:{path}"] = call + 1
        self._write_nested(component, invocation, with_call_index(path, call), value)

    def module_inputs(self, component: str, path: str, arguments: dict[str, Any]) -> None:
        """The inputs of a block (or of the component itself), as `path@argument`."""
        invocation = self._invocation.get(component)
        if invocation is None:
            return
        call = self._calls[f"{component}:{path}@"]
        self._calls[f"{component}:{path}@"] = call + 1
        for argument, value in arguments.items():
            self._write_nested(component, invocation, f"{with_call_index(path, call)}@{argument}", value)

    def pipeline(self, name: str, value: Any, step: int | None = None) -> None:
        """A pipeline-level tensor: per denoising step when `step` is given, else under main."""
        invocation = "main" if step is None else step_label(step)
        self._write_nested("pipeline", invocation, name, value)

    def _write_nested(self, component: str, invocation: str, name: str, value: Any) -> None:
        for leaf, tensor in flatten(name, value, _is_tensor):
            module = component != "pipeline"
            if module:
                self.offered += 1
                self._example = self._example or f"{component}/{leaf}"
            if self.spec.wants(component, leaf):
                self.kept += module
                self.writer.write(component, invocation, leaf, to_numpy(tensor), layout=layout_of(tensor))
