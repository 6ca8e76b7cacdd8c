"""The `parity` command line. Each subcommand lives in its own module in this package.

Exit codes (docs/errors.md): 0 success or parity, 1 divergence and nothing else, 2 bad input (the
message says what was wrong and what to do), 3 no verdict (an internal error, whose traceback goes to
a log file or, with --debug, to stderr; or an interrupt by SIGINT, SIGTERM or SIGHUP).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import time
import traceback

from sd_parity.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, is_bad_input
from sd_parity.escaping import printable_lines
from sd_parity.interrupts import handled, message, set_label
from sd_parity.threads import add_threads_argument, apply as apply_threads

DEBUG_ENV = "SD_PARITY_DEBUG"

FIRST = ("run", "compare", "capture", "report", "inspect")  # the commands most people need, listed first

DESCRIPTION = """\
Layer-by-layer parity for Stable Diffusion ports: run the real diffusers pipeline (the reference) and
your implementation (the candidate) from the same inputs, compare every intermediate tensor, and get a
verdict (parity, or the first tensor where they part and the block to blame) with an HTML report."""

EPILOG = """\
how to:
  check your port (a Python object that runs your pipeline; docs/ports.md):
      parity run --model tiny-sd1 --candidate my_port/parity.py:make --output-dir reports/my-port
  compare two run files (e.g. one your port wrote, in any language; docs/run-format.md):
      parity capture --model tiny-sd1 --output ref.h5          # the reference's run file
      parity compare ref.h5 port.h5                            # writes port-parity/report.html
  see what a run file holds:
      parity inspect ref.h5 --filter 'unet/step_000/*' --stats
  see a bug caught (our own clean-room SD with a porting mistake injected):
      parity run --model tiny-sd1 --candidate numpy --inject-fault groupnorm_eps

exit codes: 0 parity or success, 1 divergence, 2 bad input (the message says what to fix), 3 no verdict."""


def build_parser() -> argparse.ArgumentParser:
    from sd_parity import __version__

    from ._options import HelpFormatter

    parser = argparse.ArgumentParser(prog="parity", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s (sd-parity) {__version__}",
                        help="print the version and exit")
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       title="commands (parity COMMAND --help for each one's options and examples)")
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]  # _x: shared helpers
    for name in sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n)):
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    for subparser in dict.fromkeys(subparsers.choices.values()):  # accepted after the subcommand too
        add_global_options(subparser, default=argparse.SUPPRESS)
    return parser


def add_global_options(parser: argparse.ArgumentParser, default=None) -> None:
    """Options every command takes, before or after its name (after it, `default` is SUPPRESS, so the
    value given before the name stands)."""
    parser.add_argument("--debug", action="store_true", default=False if default is None else default,
                        help=f"print the traceback of an internal error (also: {DEBUG_ENV}=1)")
    add_threads_argument(parser, default=default)  # every command computes with the same thread policy


def main(argv: list[str] | None = None) -> int:
    # Nothing in this tool may reach a model hub; a user's own environment cannot turn that back on.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    with handled():
        code = _run(argv)
    _leave_if_hdf5_cannot_exit(code, argv)
    return code


def _run(argv: list[str] | None) -> int:
    command = "parity"
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit:  # argparse: 0 after --help, 2 for a usage error it has explained
            return EXIT_BAD_INPUT if exit.code not in (0, None) else 0
        command = f"parity {args.command}"
        set_label(command)
        debug = debug or args.debug
        apply_threads(args.threads)
        code = int(args.handler(args) or 0)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt as exc:  # a signal deferred to the end of a critical section (sd_parity.interrupts)
        _say(message(getattr(exc, "signum", signal.SIGINT), command))
        return EXIT_INTERNAL
    except BrokenPipeError:
        _silence_stdout()
        _say(f"{command}: error: standard output was closed before the output was complete (broken pipe); "
             "pipe into a command that reads everything, or redirect to a file")
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the exit contract: bad input is 2, anything else 3
        if debug:
            traceback.print_exc()
        if is_bad_input(exc) or _environment_error(exc):
            _say(f"{command}: error: {exc}")
            return EXIT_BAD_INPUT
        where = _log_traceback(command)
        detail = f"the traceback is in {where}" if where else "run again with --debug for the traceback"
        _say(f"{command}: internal error: {type(exc).__name__}: {_first_line(exc)}; no verdict. {detail[0].upper()}{detail[1:]}")
        return EXIT_INTERNAL


def _environment_error(exc: BaseException) -> bool:
    """An OSError about a path the user gave or the machine (a missing file, a full or read-only disk)."""
    from sd_parity.outputs import ENVIRONMENT_ERRNOS

    return isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS and exc.filename is not None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _say(message: str) -> None:
    try:
        print(printable_lines(message), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr is gone too: the exit code is all that is left


def _silence_stdout() -> None:
    """After a broken pipe, send what is still buffered nowhere, so the interpreter's exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _log_traceback(command: str) -> str | None:
    """Write the current exception's traceback to a log file in the user cache; its path, or None."""
    from sd_parity.outputs import write_atomic
    from sd_parity.paths import cache_dir

    try:
        folder = cache_dir() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"parity-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        return str(write_atomic(path, f"{command} {' '.join(sys.argv[1:])}\n{traceback.format_exc()}"))
    except Exception:  # noqa: BLE001 - no log is no reason to fail differently
        return None


def _leave_if_hdf5_cannot_exit(code: int, argv: list[str] | None) -> None:
    """After a failed HDF5 write, HDF5's own exit handler can crash the interpreter (exit 139 instead of
    ours): the command line (argv None: a real process, not a test calling main) leaves at once."""
    hdf5 = sys.modules.get("sd_parity.runs.hdf5")  # not imported: nothing was written
    if argv is None and hdf5 is not None and hdf5.write_failed():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
