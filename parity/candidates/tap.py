"""Capture from any Python port, whatever its framework: `tap`, `wrap`, `invocation` and `writer`.

    import sd_parity

    unet = sd_parity.wrap(my_unet, "unet", arguments={"x": "sample", "t": "timestep", "ctx": "encoder_hidden_states"})
    with sd_parity.writer("cand.h5", reference="ref.h5", name="my-port") as run:
        latents = run.replay.x_T
        for step in range(steps):
            noise_pred = unet(latents, t, ctx)                   # one UNet invocation (step_NNN)
            sd_parity.tap("pipeline", "noise_pred", noise_pred, step=step)

Values may be NumPy arrays, torch tensors, or anything numpy.asarray converts (JAX, MLX, tinygrad
arrays); tuples and dicts are flattened (`name[0]`, `name[key]`). Module tensors belong to an
invocation of their component (a `wrap`ped call, or a `with sd_parity.invocation(component):`
block); pipeline tensors go under `main` or, with `step=`, under the denoising step. Inside
`Candidate.capture` and `run_block` the run is already open: `tap` reports to it. Outside any run,
tap, wrap and invocation do nothing, so model code instrumented with them runs as usual.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from sd_parity.errors import BadInput
from sd_parity.runs.hdf5 import RunWriter
from sd_parity.runs.recorder import Recorder
from sd_parity.runs.selection import MODULE_COMPONENTS, CaptureSpec

from .hooks import Arguments, Hooks, Names, argument_namer, bind_arguments, capture, rename_arguments
from .replay import ReferenceReplay
from .sinks import RecorderSink, TapsSink, activated, active_sink, component_output, host_values


def report(sink: RecorderSink | TapsSink, component: str, name: str, value: Any, step: int | None = None) -> None:
    """One tapped value into `sink` (see `tap`)."""
    value = host_values(value)
    if component == "pipeline":
        sink.pipeline(name, value, step=step)
        return
    if component not in MODULE_COMPONENTS:
        raise BadInput(f"tap: unknown component {component!r}; use pipeline or {', '.join(MODULE_COMPONENTS)}")
    if "@" in name:
        raise BadInput(f"tap: {name!r} is an input; report a block's inputs together with "
                       "sd_parity.tap_inputs(component, block, {argument: value, ...})")
    if step is not None:
        raise BadInput(f"tap: step= is for pipeline tensors; {component} tensors belong to the invocation "
                       "that is open (each UNet invocation is one step)")
    _require_open(sink, component)
    sink.output(component, name, component_output(value) if name == "" else value)


def _require_open(sink: RecorderSink | TapsSink, component: str) -> None:
    if not sink.is_open(component):
        raise BadInput(f"tap: no {component} invocation is open; wrap the {component} function with "
                       f"sd_parity.wrap(fn, {component!r}) or tap inside `with sd_parity.invocation({component!r}):`")


def tap(component: str, name: str, value: Any, step: int | None = None) -> None:
    """Report `value` as tensor `name` of `component` in the run being captured.

    For a network (text_encoder, unet, vae_encoder, vae_decoder), `name` is the reference module path
    whose output `value` is (`down_blocks.1`, `encoder[last_hidden_state]`; "" is the component's own
    output). For `pipeline`, `name` is a pipeline tensor (x_T, token_ids, latent_model_input, timestep,
    noise_pred, step_output, latents, image, ...; docs/run-format.md), under `main` or step `step`.
    Outside a run it does nothing, so instrumented model code runs as usual."""
    sink = active_sink()
    if sink is not None:
        report(sink, component, name, value, step)


def report_inputs(sink: RecorderSink | TapsSink, component: str, block: str, arguments: dict[str, Any]) -> None:
    _require_open(sink, component)
    sink.inputs(component, block, host_values(dict(arguments)))


def tap_inputs(component: str, block: str, arguments: dict[str, Any]) -> None:
    """Report the inputs of `block` ("" = the component itself) as `block@argument`, by the
    reference's argument names (hidden_states, temb, encoder_hidden_states, sample, ...)."""
    sink = active_sink()
    if sink is not None:
        report_inputs(sink, component, block, arguments)


@contextmanager
def open_invocation(sink: RecorderSink | TapsSink, component: str, label: str | None = None) -> Iterator[None]:
    sink.begin(component, label)
    try:
        yield
    finally:
        sink.end(component)


def invocation(component: str, label: str | None = None):
    """One call of a network, as a `with` block: text_encoder/vae calls are call_N, UNet calls
    step_NNN, in order (or `label`, e.g. "step_003", to place it). Outside a run it does nothing."""
    sink = active_sink()
    return open_invocation(sink, component, label) if sink is not None else nullcontext()


def wrap(function: Callable, component: str, arguments: Arguments = None) -> Callable:
    """`function` as a network of the run: each call is one invocation of `component`, its arguments
    are the component's inputs (`@sample`, ...: named by its signature, or renamed by `arguments`, a
    mapping that lists the ones to keep or a function (name, argument) -> name) and its result the
    component's output. Outside a run the wrapper just calls `function`."""
    if component not in MODULE_COMPONENTS:
        raise BadInput(f"wrap: component {component!r} is not one of {', '.join(MODULE_COMPONENTS)}")
    rename = argument_namer(arguments)

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        sink = active_sink()
        if sink is None:
            return function(*args, **kwargs)
        with open_invocation(sink, component):
            bound = rename_arguments(rename, "", bind_arguments(function, args, kwargs))
            sink.inputs(component, "", host_values(bound))
            result = function(*args, **kwargs)
            sink.output(component, "", component_output(host_values(result)))
        return result

    return wrapped


class Writer:
    """A run file written from Python (`sd_parity.writer`). Atomic: the file appears, complete, when
    the `with` block ends without an error (or `close()` is called); a failed block, `abort()`, or a
    writer dropped without `close()` leaves no file and no temporary file behind."""

    def __init__(self, path: str | Path, *, reference: str | Path | None = None, name: str = "candidate",
                 capture: str = "all", metadata: dict[str, Any] | None = None, compression: str | None = None):
        from sd_parity.runs.config import library_versions

        self.path = Path(path)
        self.replay = ReferenceReplay(reference) if reference is not None else None
        settings = dict(self.replay.metadata) if self.replay is not None else {}
        settings.update(impl=name, mode="free", capture=capture, versions=library_versions())
        settings.update(metadata or {})
        try:
            spec = CaptureSpec.parse(capture)
            self._writer = RunWriter(self.path, settings, compression=compression)
        except BaseException:
            if self.replay is not None:
                self.replay.close()
            raise
        self.recorder = Recorder(self._writer, spec, total_steps=int(settings.get("steps") or 0))
        self.sink = RecorderSink(self.recorder)
        self._activation = None
        # a writer the user never closes is discarded when collected or at exit, with a warning
        self._finalizer = weakref.finalize(self, _abandon, self._writer, self.replay, str(self.path))

    # --- the run's tensors -------------------------------------------------------------------------
    def tap(self, component: str, name: str, value: Any, step: int | None = None) -> None:
        report(self.sink, component, name, value, step)

    def tap_inputs(self, component: str, block: str, arguments: dict[str, Any]) -> None:
        report_inputs(self.sink, component, block, arguments)

    def invocation(self, component: str, label: str | None = None):
        return open_invocation(self.sink, component, label)

    def capture(self, module: Any, component: str = "unet", names: Names = None, arguments: Arguments = None) -> Hooks:
        """sd_parity.capture into this run."""
        return capture(module, component, names, arguments, into=self.sink)

    # --- life cycle ----------------------------------------------------------------------------------
    def close(self) -> Path:
        """Finish the file and move it into place; returns its path."""
        if self._finalizer.detach() is not None:
            try:
                self._writer.close()
            finally:
                if self.replay is not None:
                    self.replay.close()
        return self.path

    def abort(self) -> None:
        """Discard everything written; no file is left."""
        if self._finalizer.detach() is not None:
            _discard(self._writer, self.replay)

    def __enter__(self) -> "Writer":
        self._activation = activated(self.sink)
        self._activation.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._activation.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<sd_parity.writer {self.path}>"


def _discard(writer: RunWriter, replay: ReferenceReplay | None) -> None:
    writer.abort()
    if replay is not None:
        replay.close()


def _abandon(writer: RunWriter, replay: ReferenceReplay | None, path: str) -> None:
    _discard(writer, replay)
    warnings.warn(f"sd_parity.writer({path!r}) was dropped without close(): nothing was written; "
                  "use `with sd_parity.writer(...) as run:` or call run.close()", RuntimeWarning, stacklevel=2)


def writer(path: str | Path, *, reference: str | Path | None = None, name: str = "candidate", capture: str = "all",
           metadata: dict[str, Any] | None = None, compression: str | None = None) -> Writer:
    """A run file for a port to write from Python, for `parity compare` or `sd_parity.assert_parity`.

    With `reference` (a reference run file), the run records the reference's settings (model, prompt,
    seed, sampler, x_T hash...) so the comparison knows they match, and `run.replay` hands the port
    the reference's x_T, token ids and recorded noise. `name` is the port's name in reports;
    `capture` a --capture SPEC of what to keep. Inside `with`, sd_parity.tap/wrap/capture report here."""
    return Writer(path, reference=reference, name=name, capture=capture, metadata=metadata, compression=compression)


__all__ = ["Writer", "invocation", "tap", "tap_inputs", "wrap", "writer"]
