"""CLIP's byte-level BPE tokenizer, reading the vocab.json + merges.txt of an SD `tokenizer/` folder.

The reference is transformers 5's CLIPTokenizer, which differs from OpenAI's original: it does NOT
run ftfy or unescape HTML entities (`&amp;` stays three tokens); its text normalization is NFC, then
every run of whitespace to one space, then per-character lower case. Whitespace means Unicode
White_Space, which (unlike Python's `str.isspace`) excludes the separators U+001C..U+001F.

Character classes, case mapping and NFC come from Python's `unicodedata` (Unicode 14 on Python 3.11),
the reference's from its Rust crates (newer): ids agree on every code point Python knows, and may
differ on the few thousand assigned in later Unicode versions.
"""
from __future__ import annotations

import json
import re
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ModelInputError

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_NOT_WHITESPACE = frozenset("\x1c\x1d\x1e\x1f")
_SPECIAL = re.compile(f"({re.escape(START_TOKEN)}|{re.escape(END_TOKEN)})")


def _is_space(char: str) -> bool:
    return char.isspace() and char not in _NOT_WHITESPACE


def _char_class(char: str) -> str:
    """'s' space, 'L' letter, 'N' number, 'P' anything else: the classes CLIP's split pattern uses."""
    if _is_space(char):
        return "s"
    major = unicodedata.category(char)[0]
    return major if major in "LN" else "P"


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for char in text:
        if _is_space(char):
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            # Per character, as the Rust normalizer does: no context rules such as Greek final sigma.
            out.append(char.lower())
            in_space = False
    return "".join(out)


def split_words(text: str) -> list[str]:
    """The pieces BPE runs on: contractions, letter runs, single digits, runs of other symbols.

    A lower-cased `<|endoftext|>` written in the prompt is not the special token (only the exact
    spelling is, see `Tokenizer._content_ids`) and falls apart into symbol and letter pieces here, which is
    what the reference's second, byte-level split does to it.
    """
    words, i = [], 0
    while i < len(text):
        kind = _char_class(text[i])
        if kind == "s":
            i += 1
            continue
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if contraction:
            end = i + len(contraction)
        else:
            end = i + 1
            # Digits are one token each; letters and other symbols run on.
            while kind != "N" and end < len(text) and _char_class(text[end]) == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def _byte_alphabet() -> list[str]:
    """byte -> printable character, so that every byte string is a string of vocabulary symbols.

    Bytes that are already printable Latin-1 map to themselves; the rest (controls, space, soft
    hyphen...) are shifted, in byte order, to U+0100 onwards.
    """
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


BYTE_ALPHABET = _byte_alphabet()


def _token_content(value) -> str | None:
    """A special token as tokenizer files write it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """`tokenizer(prompts)` -> int64 (len(prompts), max_length) ids: start token, the prompt's tokens, end
    token, then the pad token (SD 1.x and SDXL's first tokenizer pad with the end token, SD 2.x and SDXL's
    second with "!", id 0: whatever the folder's special_tokens_map.json / tokenizer_config.json say)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77,
                 pad_token: str = END_TOKEN):
        missing = [t for t in (START_TOKEN, END_TOKEN) if t not in vocab]
        if missing:
            raise ModelInputError(f"the tokenizer vocabulary lacks {missing}; use a CLIP vocab.json")
        if max_length < 2:
            raise ModelInputError(f"max_length {max_length} leaves no room for the start and end tokens")
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.max_length = max_length
        self.start_id = vocab[START_TOKEN]
        self.end_id = vocab[END_TOKEN]
        if pad_token not in vocab:
            raise ModelInputError(f"the pad token {pad_token!r} is not in the tokenizer vocabulary; check "
                                  "special_tokens_map.json / tokenizer_config.json")
        self.pad_id = vocab[pad_token]
        self._bpe = lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for path in (vocab_file, merges_file):
            if not path.is_file():
                raise ModelInputError(f"{path} does not exist; a CLIP tokenizer folder holds vocab.json and merges.txt")
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelInputError(f"{vocab_file} is not valid JSON ({err}); re-download the tokenizer files") from err
        merges = []
        for number, line in enumerate(merges_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or (number == 1 and line.startswith("#version")):
                continue
            pair = line.split()
            if len(pair) != 2:
                raise ModelInputError(f"{merges_file} line {number} is {line!r}; "
                                      "expected two symbols separated by a space")
            merges.append(tuple(pair))
        configs = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder / name
            try:
                configs[name] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ModelInputError(f"{path} is not valid JSON ({err}); re-download the tokenizer files") from err
        max_length = int(configs["tokenizer_config.json"].get("model_max_length", 77))
        pad = (_token_content(configs["special_tokens_map.json"].get("pad_token"))
               or _token_content(configs["tokenizer_config.json"].get("pad_token")) or END_TOKEN)
        return cls(vocab, merges, max_length, pad)

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        symbols = [BYTE_ALPHABET[b] for b in word.encode("utf-8")]
        symbols[-1] += WORD_END
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            # Left to right, so that in "a a a" the first two merge and the third stays.
            while i < len(symbols):
                if symbols[i] == pair[0] and i + 1 < len(symbols) and symbols[i + 1] == pair[1]:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        try:
            return tuple(self.vocab[s] for s in symbols)
        except KeyError as err:
            raise ModelInputError(f"BPE symbol {err.args[0]!r} is not in vocab.json; "
                                  "vocab.json and merges.txt do not belong together") from err

    def _content_ids(self, text: str) -> list[int]:
        ids = []
        # Only the exact special-token spellings are special, and they are split off before normalization.
        for index, part in enumerate(_SPECIAL.split(text)):
            if index % 2:
                ids.append(self.vocab[part])
            else:
                for word in split_words(normalize(part)):
                    ids.extend(self._bpe(word))
        return ids

    def encode(self, text: str) -> list[int]:
        """Start token, the text's tokens (at most max_length - 2 of them), end token; no padding."""
        content = self._content_ids(text)
        room = self.max_length - 2
        if len(content) > room:
            warnings.warn(f"prompt truncated to {self.max_length} tokens: the last {len(content) - room} of its "
                          f"{len(content)} tokens are dropped: {text[:60]!r}...", stacklevel=2)
            content = content[:room]
        return [self.start_id, *content, self.end_id]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int64 (len(texts), max_length): encoded and padded with the pad token, as SD pipelines do."""
        if isinstance(texts, str):
            raise ModelInputError("Tokenizer takes a list of prompts; wrap a single prompt in a list")
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, :len(encoded)] = encoded
        return ids
