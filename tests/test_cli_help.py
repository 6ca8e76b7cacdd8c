"""The command line explains itself: every option of every subcommand has help that states its default,
each subcommand's help ends with examples, one vocabulary (--candidate, --output FILE, --output-dir DIR)
with the old spellings kept as noted aliases, and `parity --help` alone tells a new user how to
compare two run files and how to check a port."""
import argparse
import re

import pytest

from sd_parity.cli import build_parser, main
from sd_parity.cli._options import has_default

PARSER = build_parser()
SUBCOMMANDS = PARSER._subparsers._group_actions[0].choices


def options(parser: argparse.ArgumentParser):
    """The parser's own arguments: not -h, not hidden (renamed spellings are hidden on purpose)."""
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]


def help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split()) if action.help else ""


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_option_has_help_with_its_default(name):
    parser = SUBCOMMANDS[name]
    for action in options(parser):
        text = help_of(parser, action)
        label = action.option_strings[0] if action.option_strings else action.dest
        assert len(text) >= 10, f"parity {name} {label}: no help text"
        if has_default(action):
            shown = action.default if isinstance(action.default, str) else str(action.default)
            assert "default" in text and (shown in text or "default:" in text), \
                f"parity {name} {label}: help does not state its default {action.default!r}: {text!r}"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_help_ends_with_examples(name):
    text = SUBCOMMANDS[name].format_help()
    examples = text[text.rindex("examples:"):]
    commands = re.findall(r"^  (parity .+)$", examples, re.M)
    assert commands and all(c.split()[1] == name for c in commands), examples
    assert text.rstrip().endswith(examples.rstrip())


def test_top_level_help_tells_how_to_compare_runs_and_check_a_port(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"compare two run files.*\n.*\n\s+parity compare ref\.h5 port\.h5", text)
    assert re.search(r"check your port.*\n\s+parity run --model tiny-sd1 --candidate \S+", text)
    for command in ("run", "compare", "capture", "report", "inspect"):
        assert re.search(rf"^    {command} ", text, re.M), command
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("parity (sd-parity) ")


def test_one_vocabulary_for_candidates_and_outputs():
    for name, parser in SUBCOMMANDS.items():
        spelled = {o for a in options(parser) for o in a.option_strings if o not in getattr(a, "renamed", ())}
        assert not spelled & {"--impl", "--backend", "--out"}, name  # still accepted, no longer shown
        assert not re.search(r"--impl|--backend|--out\b", parser.format_usage()), name
        for action in options(parser):
            if action.dest == "output_dir":
                assert "--output-dir" in action.option_strings
            if "--output" in action.option_strings and "--output" not in getattr(action, "renamed", ()):
                assert action.metavar not in ("DIR", "FOLDER"), f"parity {name} --output names a folder"
    for name in ("run", "capture", "txt2img", "img2img", "inpaint"):
        assert "--candidate" in {o for a in options(SUBCOMMANDS[name]) for o in a.option_strings}, name


@pytest.mark.parametrize("argv, dest, value", [
    (["capture", "--model", "tiny-sd1", "--impl", "numpy", "--output", "x.h5"], "candidate", "numpy"),
    (["run", "--model", "tiny-sd1", "--backend", "numpy", "torch"], "candidate", ["numpy", "torch"]),
    (["txt2img", "--model", "tiny-sd1", "--backend", "torch", "--output", "x.png"], "candidate", "torch"),
    (["export", "r.h5", "--output", "d"], "output_dir", "d"),
    (["export-inputs", "r.h5", "--block", "unet", "--out", "d"], "output_dir", "d"),
])
def test_old_spellings_still_work_and_say_so(capsys, argv, dest, value):
    args = build_parser().parse_args(argv)
    assert str(getattr(args, dest)) == str(value) if not isinstance(value, list) else getattr(args, dest) == value
    old = next(a for a in argv if a in ("--impl", "--backend", "--output", "--out"))
    assert f"note: {old} is now --" in capsys.readouterr().err


def test_new_spellings_print_no_note(capsys):
    build_parser().parse_args(["capture", "--model", "tiny-sd1", "--candidate", "numpy", "--output", "x.h5"])
    assert capsys.readouterr().err == ""
