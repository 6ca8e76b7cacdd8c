"""How every subcommand's options read: help that states defaults, examples at the end, renamed options.

One vocabulary across commands: `--candidate` names what runs as the candidate, `--output` a file to
write, `--output-dir` a folder. Older spellings still work through `add_renamed`, which prints a note.
"""
from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it names one itself); a description or epilog
    with line breaks (examples) keeps them, one without is wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        renamed = getattr(action, "renamed", ())
        if not renamed:
            return super()._format_action_invocation(action)
        shown = argparse.Action([o for o in action.option_strings if o not in renamed], action.dest, action.nargs,
                                metavar=action.metavar)
        return super()._format_action_invocation(shown)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not has_default(action):
            return text
        return f"{text} (default: %(default)s)"


def has_default(action: argparse.Action) -> bool:
    """Whether an option has a default worth stating: not absent, not an empty list, not a flag's False."""
    default = action.default
    if default is None or default is argparse.SUPPRESS or default is False or default == []:
        return False
    return not (isinstance(action, argparse._StoreTrueAction) or isinstance(action, argparse._StoreFalseAction))


def examples(*lines: tuple[str, str]) -> str:
    """An epilog of (command, what it does) pairs, the last thing `--help` prints."""
    body = "\n".join(f"  {command}\n      {what}" for command, what in lines)
    return f"examples:\n{body}"


def add_parser(subparsers, name: str, help: str, description: str | None = None,  # noqa: A002
               epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose help uses HelpFormatter; `help` is its line in `parity --help`."""
    return subparsers.add_parser(name, help=help, description=description or _sentence(help), epilog=epilog,
                                 formatter_class=HelpFormatter)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept `old` as the deprecated spelling of option `new` (same value, same checks), noting the
    rename on stderr when it is used; help shows only `new`."""
    action = next(a for a in parser._actions if new in a.option_strings)

    class Renamed(type(action)):  # type: ignore[misc]
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string == old:
                print(f"parity: note: {old} is now {new} ({old} still works, but will go)", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    action.__class__ = Renamed
    action.option_strings.append(old)
    action.renamed = (*getattr(action, "renamed", ()), old)
    parser._option_string_actions[old] = action
    action.help = f"{action.help} (formerly {old})"
