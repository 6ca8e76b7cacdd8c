"""How every status reads and looks in every output (terminal, HTML, JUnit): one line per status.

A verdict status (summary["verdict"]["status"]) has a tone and a headline; a tensor or block status
(rows, groups) has a tone. The tone decides the colour everywhere: `good` is green, `bad` red, `warn`
amber, `neutral` grey. A status not listed here reads as itself, in the neutral tone.
"""
from __future__ import annotations

VERDICTS = {  # status: (tone, headline); "identical" is parity with verdict["identical"] set
    "parity": ("good", "Parity: the candidate matches the reference within tolerance"),
    "identical": ("good", "Identical: the candidate's tensors equal the reference's bit for bit"),
    "divergence": ("bad", "Divergence: the candidate does not match the reference"),
    "isolation_only": ("bad", "Divergence in isolation only: fed the reference's inputs, a block or stage exceeds "
                              "its threshold"),
    "incomplete": ("warn", "Incomplete: reference tensors are missing from the candidate"),
}
TENSORS = {"pass": "good", "fail": "bad", "shape_mismatch": "bad", "missing": "warn", "extra": "neutral",
           "skipped": "neutral"}
TONES = ("good", "bad", "warn", "neutral")
TERMINAL_STYLES = {"good": "bold green", "bad": "bold red", "warn": "bold yellow", "neutral": "dim"}


def verdict_label(verdict: dict) -> str:
    """How a verdict (summary["verdict"]) is named: its status, or "identical" for a bit-exact parity."""
    return "identical" if verdict.get("identical") else verdict["status"]


def verdict_tone(verdict: dict) -> str:
    """A verdict's tone: its label's, but a failure the config tolerates (exit 0) only warns."""
    found = tone(verdict_label(verdict))
    return "warn" if found == "bad" and verdict["exit_code"] == 0 else found


def tone(status: str | None) -> str:
    """The tone of a verdict, tensor or block status."""
    if status in VERDICTS:
        return VERDICTS[status][0]
    return TENSORS.get(status or "", "neutral")


def headline(status: str) -> str:
    return VERDICTS[status][1] if status in VERDICTS else status.replace("_", " ").capitalize()


def terminal_style(status: str | None) -> str:
    return TERMINAL_STYLES[tone(status)]
