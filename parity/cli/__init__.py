"""The `parity` command line. Each subcommand lives in its own module in this package.

Exit codes: 0 success (or parity), 1 divergence, 2 bad input.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from sd_parity.threads import add_threads_argument, apply as apply_threads

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description="Layer-by-layer parity for Stable Diffusion ports.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        module.register(subparsers)
    for command in dict.fromkeys(subparsers.choices.values()):  # every command computes with the same thread policy
        add_threads_argument(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing in this tool may reach a model hub; a user's own environment cannot turn that back on.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("parity: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - map known bad-input errors to exit 2, re-raise the rest
        if is_bad_input(exc):
            print(f"parity {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


def is_bad_input(exc: BaseException) -> bool:
    from sd_parity.errors import BAD_INPUT_ERRORS

    return isinstance(exc, BAD_INPUT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
