"""Names are data: tensor names, prompts, metadata and paths come from files other programs wrote.

Wherever they are shown (terminal, logs, junit.xml, the HTML report) a character that is not
printable (controls such as newline or ESC, format characters such as a right-to-left override,
separators other than the space, lone surrogates) is shown as a Python-style escape (`\\x1b`,
`\\u202e`), so a name can neither forge a log line, drive the terminal, nor break an XML file.
report.js applies the same rule to what it renders. Stored data (summary.json, run files) keeps
names exactly as they are.
"""
from __future__ import annotations

import re

# XML 1.0 allows only these characters; everything else makes the file unreadable to a JUnit parser
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def escape_char(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with every non-printable character (except the space) escaped; one line, safe to print."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else escape_char(ch) for ch in text)


def printable_lines(text: str) -> str:
    """`text` with each line made printable: the line breaks a message is built with stay, everything
    else is escaped (names embedded in a message must not carry raw line breaks of their own)."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def xml_safe(text: str) -> str:
    """`text` with the characters XML 1.0 cannot hold escaped (newlines and tabs kept)."""
    return _XML_INVALID.sub(lambda m: escape_char(m.group()), text)
