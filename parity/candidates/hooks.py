"""Forward hooks that capture any torch nn.Module: the reference's networks and a PyTorch port's.

Every module's output is reported under its module path (or the name `names` gives it), the inputs
of the component itself and of each block under `path@argument` (arguments named by the module's
forward signature, or as `arguments` renames them), and each call of the root module is one
invocation of the component (a text-encoder call, a UNet step). Hooks only read: they return None,
so no output or argument is replaced, and each value is copied when it is reported, so in-place ops
that run later cannot change what was captured.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

from sd_parity.errors import BadInput
from sd_parity.runs.naming import is_block
from sd_parity.runs.selection import MODULE_COMPONENTS

from .sinks import RecorderSink, TapsSink, active_sink, component_output, sink_for

# names: a function from the module path to the reference's name (None: not captured), or a mapping
# that lists the modules to capture and their names; None keeps every module under its own path.
Names = Callable[[str], "str | None"] | Mapping[str, "str | None"] | None
# arguments: a function (name, argument) -> the reference's argument name (None: not captured), or a
# mapping keyed by "argument" or, for one module, "name@argument"; None keeps the forward's names.
Arguments = Callable[[str, str], "str | None"] | Mapping[str, "str | None"] | None


def bind_arguments(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Positional and keyword arguments of a call, named by `function`'s signature (a module's forward)."""
    signature = inspect.signature(function)
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


def module_namer(names: Names) -> Callable[[str], str | None]:
    if names is None:
        return lambda path: path
    if isinstance(names, Mapping):
        return names.get
    if callable(names):
        return names
    raise BadInput(f"names must be a function or a mapping of module paths, not {type(names).__name__}")


def argument_namer(arguments: Arguments) -> Callable[[str, str], str | None]:
    if arguments is None:
        return lambda name, argument: argument
    if isinstance(arguments, Mapping):
        return lambda name, argument: arguments.get(f"{name}@{argument}", arguments.get(argument))
    if callable(arguments):
        return arguments
    raise BadInput(f"arguments must be a function or a mapping of argument names, not {type(arguments).__name__}")


def rename_arguments(rename: Callable[[str, str], str | None], name: str, bound: dict[str, Any]) -> dict[str, Any]:
    renamed = {}
    for argument, value in bound.items():
        target = rename(name, argument)
        if target is not None:
            renamed[target] = value
    return renamed


class Hooks:
    """The hooks placed on a module: removed when the `with` block ends, or by `remove()`."""

    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def hook_module(root: Any, component: str, sink: RecorderSink | TapsSink | None = None, *, names: Names = None,
                arguments: Arguments = None, include: tuple[str, ...] = (), invocations: bool = True) -> Hooks:
    """Hook every module under `root` (only the subtrees at the paths in `include`, if given).

    With `invocations`, each call of `root` is a new invocation of `component`; otherwise the caller
    opens invocations (the reference's VAE, whose decode/encode are methods, not the module's call).
    Without a `sink`, each hook reports to the active sink of the moment, and does nothing when no
    run is being captured."""
    sink_of = (lambda: sink) if sink is not None else active_sink
    name_of, rename = module_namer(names), argument_namer(arguments)

    def begin(module, args, kwargs):
        target = sink_of()
        if target is not None:
            target.begin(component)

    def end(module, args, output):
        target = sink_of()
        if target is not None:
            target.end(component)

    def inputs_hook(name: str):
        def hook(module, args, kwargs):
            target = sink_of()
            if target is not None and target.active(component):
                bound = bind_arguments(module.forward, args, kwargs)
                target.inputs(component, name, rename_arguments(rename, name, bound))
        return hook

    def output_hook(name: str):
        def hook(module, args, output):
            target = sink_of()
            if target is not None:
                target.output(component, name, component_output(output) if name == "" else output)
        return hook

    handles = []
    try:
        for path, module in root.named_modules():
            if path == "" and invocations:
                handles.append(module.register_forward_pre_hook(begin, with_kwargs=True, prepend=True))
            if include and not any(path == top or path.startswith(top + ".") for top in include):
                continue
            name = "" if path == "" else name_of(path)  # the root is the component itself
            if name is None:
                continue
            if name == "" or is_block(component, name):
                handles.append(module.register_forward_pre_hook(inputs_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(output_hook(name)))
        if invocations:
            handles.append(root.register_forward_hook(end))  # after the root's own output hook
    except BaseException:
        Hooks(handles).remove()
        raise
    return Hooks(handles)


def capture(module: Any, component: str = "unet", names: Names = None, arguments: Arguments = None, *,
            into: Any = None) -> Hooks:
    """Capture a torch `nn.Module` as `component` of the run being captured (docs/ports.md).

        with sd_parity.capture(my_unet, "unet", names={"enc.0": "down_blocks.0", ...}):
            my_pipeline(...)

    Each call of `module` is one invocation of `component`; every submodule's output is reported under
    the name `names` gives its path (by default its own path), and the inputs of `module` and of each
    block (`down_blocks.N`, `mid_block`, ...) under `name@argument`. A name may carry the reference's
    output field when a module returns a bare tensor where the reference returns a structure, e.g.
    `"encoder[last_hidden_state]"`. `into` is the run (a RunContext, a `sd_parity.writer`, a block's
    taps); by default the hooks report to whichever run is being captured when the module runs, so
    they can stay in place across free and isolated runs and cost nothing outside them."""
    if component not in MODULE_COMPONENTS:
        raise BadInput(f"capture: component {component!r} is not one of {', '.join(MODULE_COMPONENTS)} "
                       "(pipeline tensors are reported with sd_parity.tap)")
    if not callable(getattr(module, "register_forward_hook", None)):
        raise BadInput(f"capture: {type(module).__name__} is not a torch nn.Module; for other frameworks use "
                       "sd_parity.tap and sd_parity.wrap")
    return hook_module(module, component, sink_for(into) if into is not None else None, names=names,
                       arguments=arguments)
