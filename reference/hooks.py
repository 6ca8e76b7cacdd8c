"""Forward hooks that report every submodule output, and the inputs of every block, to a Recorder."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from sd_parity.runs.naming import is_block
from sd_parity.runs.recorder import Recorder


def bind_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Positional and keyword arguments of a call, named by the module's forward signature."""
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return {**{str(i): a for i, a in enumerate(args)}, **kwargs}
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            named.update({f"{name}[{i}]": v for i, v in enumerate(value)})
        else:
            named[name] = value
    return named


@contextmanager
def capture_module(recorder: Recorder, component: str, root: torch.nn.Module,
                   include: tuple[str, ...] = (), invocation_root: bool = True) -> Iterator[None]:
    """Hook every module under `root` (paths relative to it; only the subtrees in `include` if given).

    With `invocation_root`, each call of `root` itself is a new invocation of the component (text
    encoder calls, UNet steps); otherwise the caller opens invocations (the VAE's decode/encode).
    """
    handles = []
    try:
        for path, module in root.named_modules():
            if include and not any(path == top or path.startswith(top + ".") for top in include):
                continue
            if path == "" and invocation_root:
                handles.append(module.register_forward_pre_hook(
                    _begin(recorder, component), with_kwargs=True, prepend=True))
            if path == "" or is_block(component, path):
                handles.append(module.register_forward_pre_hook(_inputs(recorder, component, path), with_kwargs=True))
            handles.append(module.register_forward_hook(_output(recorder, component, path)))
            if path == "" and invocation_root:
                handles.append(module.register_forward_hook(_end(recorder, component)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _begin(recorder: Recorder, component: str):
    def hook(module, args, kwargs):
        recorder.begin_invocation(component)
    return hook


def _end(recorder: Recorder, component: str):
    def hook(module, args, output):
        recorder.end_invocation(component)
    return hook


def _inputs(recorder: Recorder, component: str, path: str):
    def hook(module, args, kwargs):
        if recorder.active(component):
            recorder.module_inputs(component, path, bind_arguments(module, args, kwargs))
    return hook


def _output(recorder: Recorder, component: str, path: str):
    def hook(module, args, output):
        if recorder.active(component):
            recorder.module_output(component, path, output)
    return hook
