"""A port in any language as a candidate: sd-parity runs its command line and exchanges run folders.

    parity run --model M --candidate-cmd "my-port run-block {component} {block} {inputs} {outputs}" \\
                         --candidate-cmd-run "my-port run {config} {output}"

Isolated mode (`--candidate-cmd`): for every block of every invocation the reference captured, the
block's inputs are written as a run folder ({inputs}: `<component>/<invocation>/<block>@<argument>.npy`
plus run.json), the command runs, and the run folder it wrote into {outputs} (an empty folder made
for it) is recorded as the block's tensors: at least the block's own output, named as the reference
names it (`down_blocks.1[0]`, `mid_block`, ...), and any tensors inside the block. {block} is "" for
the component's own pass (its tensors outside every block). Exit 0 on success, EXIT_UNSUPPORTED (3)
for "this block cannot run alone", anything else is an error.

Free mode (`--candidate-cmd-run`): {config} is a JSON file describing the run (RunConfig's fields,
`model` as a folder, `inputs` and `output`); {inputs} a run folder with what to replay (x_T, token ids,
recorded noise); the command writes its whole run to {output} (a run folder or an HDF5 run file).

docs/run-format.md ("A port as a command") is the contract, with examples.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sd_parity.errors import BadInput
from .registry import COMMAND_SPEC_PREFIX
from sd_parity.runs.config import RunConfig
from sd_parity.runs.directory import DirectoryRunReader, DirectoryRunWriter
from sd_parity.runs.hdf5 import RunFileError
from sd_parity.runs.naming import module_path
from sd_parity.runs.open import copy_run, open_run

from .protocol import Candidate, RunContext

EXIT_UNSUPPORTED = 3
PLACEHOLDERS = {
    "block": ("component", "block", "invocation", "inputs", "outputs", "config", "model"),
    "run": ("config", "inputs", "output", "model"),
}
# Pipeline tensors a free run replays instead of reproducing: the initial noise, the token ids (so a
# port may skip its tokenizer at first), and the draws of stochastic samplers and the VAE posterior.
REPLAYED = re.compile(r"^pipeline/(main/(x_T|(negative_)?token_ids(_\d+)?|posterior_noise(#\d+)?)|step_\d+/noise)$")
STDERR_LINES = 20
INTERPRETERS = r"(python|node|ruby|java|bash|sh|env|swift|dotnet|deno|bun)[\d.]*"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class CommandCandidate(Candidate):
    """A foreign program driven through `block_command` (isolated mode) and `run_command` (free mode)."""

    def __init__(self, block_command: str | None = None, run_command: str | None = None, name: str | None = None):
        if not block_command and not run_command:
            raise BadInput("a command candidate needs --candidate-cmd (isolated mode), --candidate-cmd-run "
                           "(free mode) or both")
        self.block_command, self.run_command = block_command or None, run_command or None
        for option, template, kind in (("--candidate-cmd", self.block_command, "block"),
                                       ("--candidate-cmd-run", self.run_command, "run")):
            if template is not None:
                _check_template(option, template, kind)
        self.name = name or _program_name(shlex.split(self.block_command or self.run_command))
        self.facts = {"command": {k: v for k, v in (("run_block", self.block_command), ("run", self.run_command)) if v}}
        self.config: RunConfig | None = None
        self.model_dir: Path | None = None

    # --- the --candidate SPEC form, so a case can name it and `parity run --candidate SPEC` repeat it ---
    def spec(self) -> str:
        commands = {k: v for k, v in (("block", self.block_command), ("run", self.run_command)) if v}
        return f"{COMMAND_SPEC_PREFIX}{json.dumps(commands)}:{self.name}"

    @classmethod
    def from_spec(cls, spec: str) -> "CommandCandidate":
        body, _, name = spec[len(COMMAND_SPEC_PREFIX):].rpartition(":")
        try:
            commands = json.loads(body)
            return cls(commands.get("block"), commands.get("run"), name or None)
        except (ValueError, AttributeError) as exc:
            raise BadInput(f"--candidate {spec!r}: not a command candidate spec ({exc}); use --candidate-cmd "
                           "and --candidate-cmd-run instead") from exc

    def supports_free(self) -> bool:
        return self.run_command is not None

    def supports_blocks(self) -> bool:
        return self.block_command is not None

    def prepare(self, config: RunConfig, model_dir: Path) -> None:
        self.config, self.model_dir = config, Path(model_dir).resolve()

    # --- free mode ------------------------------------------------------------------------------------
    def capture(self, run: RunContext) -> None:
        if self.run_command is None:
            raise BadInput(f"{self.name}: free mode needs --candidate-cmd-run \"PROGRAM run {{config}} {{output}}\"")
        work = Path(tempfile.mkdtemp(prefix="sd-parity-run-"))
        inputs, output = work / "inputs", work / "output"
        with DirectoryRunWriter(inputs, {"replay_of": str(getattr(run.replay, "path", "") or "seeded")}) as writer:
            _write_replay(run, writer)
        config = self._write_config(work, inputs=inputs, output=output)
        argv = _expand(self.run_command, config=config, inputs=inputs, output=output, model=self.model_dir)
        result = _execute(argv, "its free run", work)
        if result.returncode == EXIT_UNSUPPORTED:
            raise _failure(argv, work, result, f"exited {EXIT_UNSUPPORTED} (unsupported) for its free run")
        if not output.exists():
            raise _failure(argv, work, result, f"exited 0 but wrote nothing at {{output}} ({output})")
        try:
            with open_run(output) as produced:
                for entry in produced.entries():
                    if _selected(run, entry):
                        run.recorder.writer.write(entry.component, entry.invocation, entry.name,
                                                  produced.read(entry), layout=entry.layout)
                if produced.metadata:
                    run.metadata["port_metadata"] = produced.metadata
        except RunFileError as exc:
            raise _failure(argv, work, result, f"wrote a run at {{output}} that is not valid: {exc}") from exc
        shutil.rmtree(work, ignore_errors=True)

    # --- isolated mode --------------------------------------------------------------------------------
    def run_block(self, component: str, block: str, inputs: dict[str, np.ndarray], taps) -> None:
        if self.block_command is None:
            raise NotImplementedError("no --candidate-cmd")
        recorder = getattr(taps, "recorder", None)
        invocation = (recorder.current_invocation(component) if recorder is not None else None) or "main"
        work = Path(tempfile.mkdtemp(prefix="sd-parity-block-"))
        inputs_dir, outputs_dir = work / "inputs", work / "outputs"
        with DirectoryRunWriter(inputs_dir, {"component": component, "block": block,
                                             "invocation": invocation}) as writer:
            for argument, value in inputs.items():
                writer.write(component, invocation, f"{block}@{argument}", value)
        outputs_dir.mkdir()
        config = self._write_config(work)
        argv = _expand(self.block_command, component=component, block=block, invocation=invocation,
                       inputs=inputs_dir, outputs=outputs_dir, config=config, model=self.model_dir)
        what = f"{component} block {block!r}" if block else f"{component} (whole component)"
        result = _execute(argv, what, work)
        if result.returncode == EXIT_UNSUPPORTED:
            shutil.rmtree(work, ignore_errors=True)
            raise NotImplementedError(f"{self.name} cannot run {what} alone")
        _report_outputs(argv, work, result, component, block, inputs, outputs_dir, taps)
        shutil.rmtree(work, ignore_errors=True)

    def _write_config(self, work: Path, **paths: Path) -> Path:
        config = self.config
        fields = {**dataclasses.asdict(config), "model": str(self.model_dir), "prompt": config.prompts(),
                  "negative_prompt": config.negative_prompts(), **{k: str(v) for k, v in paths.items()}}
        path = work / "config.json"
        path.write_text(json.dumps(fields, indent=1) + "\n")
        return path


def _program_name(words: list[str]) -> str:
    """The port's name for reports: the program's, or the script's when the program is an interpreter."""
    stem = Path(words[0]).stem
    if re.fullmatch(INTERPRETERS, stem) and len(words) > 1 and not words[1].startswith(("-", "{")):
        stem = Path(words[1]).stem
    return stem


def _check_template(option: str, template: str, kind: str) -> None:
    try:
        tokens = shlex.split(template)
    except ValueError as exc:
        raise BadInput(f"{option} {template!r}: {exc}") from exc
    if not tokens:
        raise BadInput(f"{option} is empty; give the command line of your program")
    unknown = sorted({m.group(1) for t in tokens for m in _PLACEHOLDER.finditer(t)} - set(PLACEHOLDERS[kind]))
    if unknown:
        raise BadInput(f"{option}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                       f"available: {', '.join('{' + p + '}' for p in PLACEHOLDERS[kind])}")


def _expand(template: str, **values: Any) -> list[str]:
    """The template's words with placeholders replaced (no shell: paths with spaces stay one argument)."""
    return [_PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), token)
            for token in shlex.split(template)]


def _execute(argv: list[str], what: str, work: Path) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as exc:
        raise _failure(argv, work, None, f"cannot be started: {exc}") from exc
    if result.returncode not in (0, EXIT_UNSUPPORTED):
        raise _failure(argv, work, result, f"failed on {what} with exit code {result.returncode}")
    return result


def _failure(argv: list[str], work: Path, result: subprocess.CompletedProcess | None, problem: str) -> BadInput:
    lines = (result.stderr if result is not None else "").rstrip().splitlines()[-STDERR_LINES:]
    tail = ("; its stderr ended with:\n    " + "\n    ".join(lines)) if lines else "; it wrote nothing to stderr"
    return BadInput(f"candidate command {problem}{tail if result is not None else ''}\n"
                    f"  command: {shlex.join(argv)}\n  its files are kept in {work} to rerun it by hand")


def _report_outputs(argv, work, result, component: str, block: str, inputs: dict[str, np.ndarray],
                    outputs_dir: Path, taps) -> None:
    def fail(problem: str) -> BadInput:
        return _failure(argv, work, result, problem)

    if not any(outputs_dir.iterdir()):
        raise fail(f"exited 0 but wrote nothing into {{outputs}}; write the block's outputs there, or exit "
                   f"{EXIT_UNSUPPORTED} when it cannot run this block alone")
    try:
        produced = DirectoryRunReader(outputs_dir)
    except RunFileError as exc:
        raise fail(f"wrote outputs that are not a valid run folder: {exc}") from exc
    with produced:
        entries = produced.entries()
        strangers = sorted({e.component for e in entries} - {component})
        if strangers:
            raise fail(f"wrote tensors of {', '.join(strangers)} for a {component} block; write them under "
                       f"{component}/<invocation>/")
        own = [e for e in entries if "@" not in e.name and module_path(e.name) == block]
        if block and not own:
            raise fail(f"wrote no output of block {block} (expected {component}/<invocation>/{block}.npy, or its "
                       f"flattened parts such as {block}[0].npy); it wrote {', '.join(e.name for e in entries[:5])}")
        batch = next((v.shape[0] for v in inputs.values() if np.ndim(v) >= 2), None)
        wrong = [e for e in own if batch is not None and len(e.shape) >= 2 and e.shape[0] != batch]
        if wrong:
            raise fail(f"wrote {wrong[0].name} with shape {list(wrong[0].shape)}, but the block's inputs have "
                       f"batch {batch} (shapes are NCHW / (batch, tokens, channels), as the reference's)")
        if block:  # the block's own inputs are the reference's: recorded as given, as a Python candidate's are
            taps.inputs(block, inputs)
        for entry in entries:
            value = produced.read(entry)
            if "@" in entry.name:
                path, argument = entry.name.split("@", 1)
                taps.inputs(path, {argument: value})
            else:
                taps.output(entry.name, value)


def _selected(run: RunContext, entry) -> bool:
    """Whether the run's capture selection (--capture) keeps this tensor of the port's run."""
    spec = run.recorder.spec
    if not (spec.wants_component(entry.component) and spec.wants(entry.component, entry.name)):
        return False
    step = entry.invocation.removeprefix("step_")
    return entry.component != "unet" or not step.isdigit() or spec.wants_step(int(step), run.config.steps)


def _write_replay(run: RunContext, writer: DirectoryRunWriter) -> None:
    """What a free run replays from the reference (or, without one, the seeded x_T)."""
    reference = getattr(run.replay, "path", None)
    if reference is None:
        writer.write("pipeline", "main", "x_T", run.replay.x_T)
        return
    with open_run(reference) as ref:
        copy_run(ref, writer, keys={e.key for e in ref.entries() if REPLAYED.match(e.key)})
