"""Unit-by-unit parity of impl/'s networks with the reference modules: the shared machinery of
tests/test_impl_models.py (SD 1.x) and tests/test_impl_families.py (SD 2.x, SDXL).

A unit is a component end to end (path "") or one of its blocks. It is fed the reference's captured
inputs (`unit_inputs`); every tensor the reference captured inside it must be tapped by impl under the
same name (`Collect` names taps as the reference recorder does), with the same shape and dtype, and lie
within the floor of its backend/dtype (`FLOORS`, `check_floor`):

    torch fp32, fp64, fp16, bf16   bit-identical (max |d| == 0)
    numpy fp32                     relative L2 <= 1e-5
    numpy fp64                     relative L2 <= 1e-12 (UNet end to end: 1e-6, see docs/precision.md)
    numpy fp16                     relative L2 <= 1e-2
    numpy bf16                     relative L2 <= 6e-2
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from sd_parity.fixtures import FIXTURES
from sd_parity.impl.families import COMPONENTS
from sd_parity.runs.naming import Block, flatten, module_path, with_call_index
from sd_parity.runs.recorder import to_numpy

BACKENDS = ("torch", "numpy")
DTYPES = ("fp32", "fp64", "fp16", "bf16")
# the largest relative L2 error allowed per tensor, per (backend, dtype); None = bit-identical
FLOORS = {("torch", d): None for d in DTYPES}
FLOORS.update({("numpy", "fp32"): 1e-5, ("numpy", "fp64"): 1e-12, ("numpy", "fp16"): 1e-2, ("numpy", "bf16"): 6e-2})
# NumPy fp64, UNet end to end: the time embedding is float32 in both implementations (as diffusers
# computes it), and NumPy's float32 sin/cos differ from torch's in the last bit (docs/precision.md).
UNET_E2E_FP64 = 1e-6


def block_paths(fixture: str, component: str) -> list[str]:
    """The blocks of a fixture's component, from its configs (no model needs to exist to collect tests)."""
    spec, prefix = FIXTURES[fixture], COMPONENTS[component].top_prefix
    if component.startswith("text_encoder"):
        return [f"{prefix}encoder.layers.{i}" for i in range(spec[component]["num_hidden_layers"])]
    if component == "unet":
        n = len(spec["unet"]["block_out_channels"])
        return [f"down_blocks.{i}" for i in range(n)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(n)]
    n = len(spec["vae"]["block_out_channels"])
    return ["decoder.mid_block"] + [f"decoder.up_blocks.{i}" for i in range(n)]


def unit_id(component: str, path: str) -> str:
    return Block(component, path).test_id if path else f"{COMPONENTS[component].test_stem}_e2e"


def is_tensor(value) -> bool:
    return isinstance(value, np.ndarray) or type(value).__name__ == "Tensor"


class Collect:
    """A taps object naming values as the reference recorder does (#k calls, flattened structures)."""

    def __init__(self):
        self.values: dict[str, np.ndarray] = {}
        self.calls: dict[str, int] = defaultdict(int)

    def output(self, path, value):
        call = self.calls[path]
        self.calls[path] += 1
        for name, tensor in flatten(with_call_index(path, call), value, is_tensor):
            self.values[name] = to_numpy(tensor)

    def inputs(self, path, args):
        call = self.calls[path + "@"]
        self.calls[path + "@"] += 1
        for argument, value in args.items():
            for name, tensor in flatten(f"{with_call_index(path, call)}@{argument}", value, is_tensor):
                self.values[name] = to_numpy(tensor)


def in_unit(name: str, path: str) -> bool:
    owner = module_path(name)
    return not path or owner == path or owner.startswith(path + ".")


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    norm = np.linalg.norm(ref64)
    diff = np.linalg.norm(ref64 - got64)
    return float(diff / norm) if norm > 0 else float(diff)


def compare_unit(reference: dict[str, np.ndarray], taps: dict[str, np.ndarray], path: str):
    """Per tensor (name, max |d|, rel L2) for the unit at `path`; raises on coverage/shape/dtype errors."""
    expected = {n: v for n, v in reference.items() if in_unit(n, path)}
    got = {n: v for n, v in taps.items() if in_unit(n, path)}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing, f"{len(missing)} reference tensors not tapped: {missing[:10]}"
    assert not extra, f"{len(extra)} tapped tensors the reference does not have: {extra[:10]}"
    rows = []
    for name, ref in expected.items():
        mine = got[name]
        assert mine.shape == ref.shape, f"{name}: shape {mine.shape}, reference {ref.shape}"
        assert mine.dtype == ref.dtype, f"{name}: dtype {mine.dtype}, reference {ref.dtype}"
        if ref.dtype.kind in "iub":
            rows.append((name, float(np.abs(ref.astype(np.int64) - mine.astype(np.int64)).max(initial=0)), 0.0))
        else:
            diff = np.abs(ref.astype(np.float64) - mine.astype(np.float64))
            rows.append((name, float(diff.max(initial=0.0)), rel_l2(ref, mine)))
    assert rows, f"no reference tensors under {path!r}"
    return rows


def unit_inputs(reference: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    prefix = path + "@"
    """The reference's captured inputs of the unit at `path`, named by argument (first call only)."""
    return {name[len(prefix):]: value for name, value in reference.items()
            if name.startswith(prefix) and "#" not in name.split("@", 1)[0]}


def unit_floor(backend: str, dtype: str, component: str, path: str) -> float | None:
    """The floor of a unit: FLOORS, with NumPy fp64's for the UNet end to end."""
    if (backend, dtype, component, path) == ("numpy", "fp64", "unet", ""):
        return UNET_E2E_FP64
    return FLOORS[(backend, dtype)]


def check_floor(rows, floor: float | None) -> None:
    """Assert the compare_unit rows lie within `floor` (relative L2; None: bit-identical)."""
    if floor is None:
        worst = max(rows, key=lambda r: r[1])
        assert worst[1] == 0.0, f"not bit-identical: {worst[0]} max |d| = {worst[1]:.3e} ({len(rows)} tensors)"
    else:
        worst = max(rows, key=lambda r: r[2])
        assert worst[2] <= floor, f"{worst[0]}: rel L2 {worst[2]:.3e} > {floor:.0e} (max |d| {worst[1]:.3e})"


class DictWriter:
    def __init__(self):
        self.values: dict[str, np.ndarray] = {}

    def write(self, component, invocation, name, array, **attributes):
        self.values[name] = array


def capture(component: str, module, call, include=()):
    """Run `call()` under the reference hooks; {name: array} as the run file would hold them."""
    import torch

    from sd_parity.runs.selection import CaptureSpec
    from sd_parity.runs.recorder import Recorder
    from sd_parity.candidates.hooks import hook_module
    from sd_parity.candidates.sinks import RecorderSink

    writer = DictWriter()
    recorder = Recorder(writer, CaptureSpec.parse("all"), total_steps=1)
    with torch.inference_mode(), hook_module(module, component, RecorderSink(recorder), include=include,
                                             invocations=not include):
        if include:
            with recorder.invocation(component):
                call(recorder)
        else:
            call(recorder)
    return writer.values
