"""The fp64 oracles that calibrate thresholds, at a memory cost that fits beside the rest of a run.

* `ResidentNetworks`: the pipeline's networks (the family's component folders: text encoder(s), UNet,
  VAE) held one at a time. Each is loaded with its weights, which are dropped as soon as the pipeline
  moves on to another network and loaded again if it comes back (the VAE of img2img encodes first and
  decodes last). An fp64 run of SD 1.5 then peaks at its UNet's 6.9 GB instead of the whole
  pipeline's 8.6 GB, plus activations.
* `exact_time_embedding`: diffusers computes the sinusoidal time embedding in float32 whatever the
  model's dtype, so an fp64 run would carry float32's error there (up to ~5e-5 at t = 999, where sin
  and cos see angles near 1000); the oracle computes it in float64 like everything else.
* `run_block_oracle`: every block the reference captured inputs for, re-run in fp64 on exactly those
  inputs, with only that block's weights in memory: the oracle for isolated runs, whose candidate
  blocks get the same inputs. Its thresholds then measure the reference's own error in the block, not
  error inherited from upstream (which the whole-run oracle's inputs differ by).
"""
from __future__ import annotations

import math
import mmap
from collections import defaultdict
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from sd_parity.impl.families import COMPONENTS, detect_family
from sd_parity.runs.config import RunConfig, run_metadata

TORCH_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
from sd_parity.runs.hdf5 import RunReader, RunWriter
from sd_parity.runs.recorder import Recorder
from sd_parity.runs.selection import MODULE_COMPONENTS, CaptureSpec


def entry_modules(family, network: str) -> tuple[str, ...]:
    """The modules of a network (a component folder) whose first call needs its weights: the root, or the
    subtrees of the components that share it (the VAE's halves are called separately)."""
    return tuple(path for c in family.components if c.folder == network for path in (c.subtrees or ("",)))


def release(module: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Drop a module's parameters: size-0 tensors (of `dtype`, or the parameter's) take their place."""
    for parameter in module.parameters():
        parameter.data = torch.empty(0, dtype=dtype or parameter.dtype, device=parameter.device)


def _adopt(module: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """Give `module` the weights and buffers of `loaded`, an identically built copy."""
    for name, tensor in chain(loaded.named_parameters(), loaded.named_buffers()):
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attribute in owner._parameters:
            owner._parameters[attribute].data = tensor.data
        else:
            owner._buffers[attribute] = tensor


def _copy(view: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A weight tensor copied as `dtype`. A tensor of a memory-mapped file leaves the file's pages mapped
    in the process after reading, counted in its resident memory: they are dropped again here, so
    loading a network costs its own size, not its size plus its file's."""
    copy = np.array(view, dtype=dtype)
    mapping = getattr(view, "_mmap", None)
    if mapping is not None and view.nbytes:
        start = view.ctypes.data - np.frombuffer(mapping, np.uint8).ctypes.data
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, first, start + view.nbytes - first)
    return copy


class NetworkWeights:
    """A network's weight files, read tensor by tensor under the network's own parameter names (the
    files may prefix them, as transformers' `text_model.`)."""

    def __init__(self, folder: Path):
        from sd_parity.impl.tensor_files import open_component

        self.files = open_component(folder)

    def _key(self, name: str) -> str | None:
        if name in self.files:
            return name
        matches = [key for key in self.files if key.endswith("." + name)]
        return matches[0] if len(matches) == 1 else None

    def load(self, module: torch.nn.Module, prefix: str = "") -> bool:
        """Fill `module`'s parameters (`prefix`: its path in the network) from the files, each in the
        parameter's dtype, as the loader converts them; False (nothing loaded) when a name is missing,
        e.g. a legacy checkpoint whose names only the loader converts."""
        parameters = list(module.named_parameters())
        keys = [self._key(f"{prefix}{name}") for name, _ in parameters]
        if any(key is None for key in keys):
            return False
        for (_, parameter), key in zip(parameters, keys):
            dtype = parameter.dtype
            wide = np.float64 if dtype == torch.float64 else np.float32
            parameter.data = torch.from_numpy(_copy(self.files[key], wide)).to(dtype)
        return True


class ResidentNetworks:
    """Keeps at most one of a pipeline's networks' weights in memory.

    `load(name, dtype)` returns network `name` (text_encoder, unet, vae) loaded by the pipeline loader at
    `dtype`. `released(name)` gives the network's structure without weights, for the pipeline to be
    built around; while `attached()`, each network gets its weights (tensor by tensor from its folder's
    files, or from the loader) when one of its modules is first called, and the others drop theirs."""

    def __init__(self, model_dir: Path, dtype: str, load: Callable[[str, str], torch.nn.Module]):
        self.model_dir, self.dtype, self._load = model_dir, dtype, load
        self.family = detect_family(model_dir)
        self.names = self.family.folders  # the networks, by component folder (text_encoder, ..., vae)
        self.resident: str | None = None
        self._modules: dict[str, torch.nn.Module] = {}

    def released(self, name: str) -> torch.nn.Module:
        # the structure is loaded at most at float32 (what the files hold), then given the run's dtype
        module = self._load(name, "fp32" if self.dtype == "fp64" else self.dtype)
        dtype = TORCH_DTYPES[self.dtype]
        release(module, dtype)
        for buffer_owner in module.modules():
            for key, buffer in buffer_owner._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    buffer_owner._buffers[key] = buffer.to(dtype)
        self._modules[name] = module
        return module

    def ensure(self, name: str) -> None:
        if self.resident == name:
            return
        if self.resident is not None:
            release(self._modules[self.resident])
            self.resident = None
        module = self._modules[name]
        # The loader maps the weight files and hands out views of them (no copy at the files' dtype; and
        # the kernels' roundings depend on the views' alignment, so a copy would change the reference's
        # results). Only a wider dtype than the files' (the fp64 oracle) is read tensor by tensor, to
        # convert one tensor at a time rather than hold the whole file beside the converted network.
        # The pipeline may have moved the network to another dtype (SDXL's VAE to float32, force_upcast):
        # it then gets the run's weights converted, as diffusers converts the loaded network.
        current = next(module.parameters()).dtype
        if self.dtype != "fp64" or not NetworkWeights(self.model_dir / name).load(module):
            loaded = self._load(name, self.dtype)
            _adopt(module, loaded if current == TORCH_DTYPES[self.dtype] else loaded.to(current))
        self.resident = name

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = []
        try:
            for name, module in self._modules.items():
                for path in entry_modules(self.family, name):
                    handles.append(module.get_submodule(path).register_forward_pre_hook(
                        lambda *_, name=name: self.ensure(name), prepend=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in self._modules.values():
                release(module)
            self.resident = None


# ---------------------------------------------------------------------------------------------------
# the time embedding in float64


def _float64_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                                max_period=10000):
    """diffusers' get_timestep_embedding, step for step, in float64."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float64,
                                                     device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = timesteps[:, None].double() * torch.exp(exponent)[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


@contextmanager
def exact_time_embedding() -> Iterator[None]:
    from diffusers.models import embeddings

    original = embeddings.get_timestep_embedding
    embeddings.get_timestep_embedding = _float64_timestep_embedding
    try:
        yield
    finally:
        embeddings.get_timestep_embedding = original


# ---------------------------------------------------------------------------------------------------
# the block-local oracle


def run_block_oracle(config: RunConfig, reference: Path, output: Path) -> Path:
    """Each block of `reference` re-run in fp64 on its captured inputs (one block's weights resident),
    every module output inside it captured as the reference names it (what the reference kept)."""
    from sd_parity.candidates.runner import blocks_with_inputs, inputs_of

    from sd_parity.runs.config import unet_parameter_count

    from sd_parity.candidates.hooks import hook_module
    from sd_parity.candidates.sinks import RecorderSink
    from .runner import WRITE_QUEUE_BYTES, load_network

    model_dir = config.model_dir()
    with RunReader(reference) as ref:
        spec = CaptureSpec.parse(config.capture_spec(unet_parameter_count(model_dir)))
        metadata = {**run_metadata(config, impl="reference", model_dir=model_dir, x_t=ref.read("pipeline/main/x_T"),
                                   scheduler_config=ref.metadata.get("scheduler_config", {}), mode="block_oracle"),
                    "dtype": "fp64", "block_oracle_of": ref.metadata.get("dtype")}
        entries = defaultdict(list)
        for entry in ref.entries():
            entries[(entry.component, entry.invocation)].append(entry)
        with RunWriter(output, metadata, compression=config.compression, background_bytes=WRITE_QUEUE_BYTES) as writer, \
                torch.inference_mode(), exact_time_embedding():
            recorder = _OutputsOnly(writer, spec, total_steps=config.steps)
            for component in (c for c in MODULE_COMPONENTS if c in ref.components()):
                network = COMPONENTS[component].folder
                module = load_network(model_dir, network, "fp32")
                release(module, torch.float64)
                weights = _BlockWeights(module, model_dir, network)
                with hook_module(module, component, RecorderSink(recorder), include=COMPONENTS[component].subtrees,
                                 invocations=False):
                    by_block: dict[str, list[str]] = defaultdict(list)
                    for invocation in ref.invocations(component):
                        for block in blocks_with_inputs(component, entries[(component, invocation)]):
                            if block:
                                by_block[block].append(invocation)
                    for block, invocations in by_block.items():  # one block's weights at a time
                        with weights.resident(block) as runnable:
                            for invocation in invocations:
                                inputs = inputs_of(ref, entries[(component, invocation)], block)
                                with recorder.invocation(component, invocation):
                                    runnable(**_arguments(runnable, inputs))
    return output


class _OutputsOnly(Recorder):
    """Module outputs only: a block oracle's inputs are the reference's own, already in its run file."""

    def module_inputs(self, component: str, path: str, arguments: dict[str, Any]) -> None:
        pass


def _arguments(block: torch.nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Captured `block@argument` tensors as float64 keyword arguments (flattened tuples regrouped); a
    required argument that was not captured was None (the capture keeps tensors only)."""
    import inspect

    from sd_parity.impl.scope import unflatten_inputs

    def tensor(value):
        if isinstance(value, tuple):
            return tuple(tensor(v) for v in value)
        array = np.asarray(value)
        return torch.from_numpy(array.astype(np.float64) if array.dtype.kind == "f" or array.dtype.name == "bfloat16"
                                else array.astype(np.int64))
    arguments = {name: tensor(value) for name, value in unflatten_inputs(inputs).items()}
    for name, parameter in inspect.signature(block.forward).parameters.items():
        if parameter.default is inspect.Parameter.empty and parameter.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            arguments.setdefault(name, None)
    return arguments


class _BlockWeights:
    """A network's blocks made runnable one at a time in fp64."""

    def __init__(self, module: torch.nn.Module, model_dir: Path, network: str):
        self.module, self.model_dir, self.network = module, model_dir, network
        self.weights = NetworkWeights(model_dir / network)

    @contextmanager
    def resident(self, block: str) -> Iterator[torch.nn.Module]:
        target = self.module.get_submodule(block)
        if not self.weights.load(target, prefix=f"{block}."):
            # weights stored under other names (e.g. a legacy VAE): the loader converts them, whole
            from .runner import load_network

            _adopt(target, load_network(self.model_dir, self.network, "fp64").get_submodule(block))
        try:
            yield target
        finally:
            release(target)
