"""impl.tokenizer against transformers' CLIPTokenizer, called the way the diffusers SD pipeline calls it."""
from __future__ import annotations

import unicodedata
import warnings

import numpy as np
import pytest

from sd_parity.impl.errors import ModelInputError
from sd_parity.impl.tokenizer import Tokenizer
from sd_parity.fixtures import ensure_fixture, load_prompts

ADVERSARIAL = [
    # special tokens: only the exact spelling is special, anywhere in the text
    "a <|endoftext|> b", "<|startoftext|>hi<|endoftext|>", "x<|ENDOFTEXT|>y", "<|endoftext|",
    "<|endoftext|><|endoftext|>",
    # case mapping is per character: no final sigma, Turkish dotted I expands, sharp s variants
    "ΟΔΟΣ ΣΑΣ", "İSTANBUL ıi", "STRASSE ß ẞ", "ǅemal ǈ",
    # NFC composition and characters NFC changes or keeps
    "e\u0301 A\u030a \u212b \u2126 q\u0301 \u1100\u1161\u11a8", "ﬁne ＡＢＣ １２３ ½ ² Ⅻ",
    # whitespace: Unicode White_Space collapses, U+001C..U+001F and zero-width characters do not
    "a\u00a0b\u3000c\u2028d\u200be\ufeff f", "a\x1cb\x1dc\x1ed\x1ff", "\r\n\t \x0b\x0c x \x85 y \u1680 z",
    "   ", "\n",
    # scripts without spaces, combining marks, right-to-left
    "नमस्ते दुनिया", "สวัสดีครับ", "مرحبا بالعالم ٣٤", "שָׁלוֹם", "안녕하세요 세계", "東京タワーの夜景を見る",
    # emoji sequences: ZWJ families, flags, skin tones, keycaps
    "👩‍👩‍👧‍👦 🇯🇵🇫🇷 👍🏽 1️⃣ ❤️‍🔥", "🚀" * 30,
    # contractions, apostrophes and quotes
    "DON'T you'll've 's'S'sa ''s it’s 'tis rock'n'roll", "o'clock I'M WE'D THEY'RE",
    # digits are single tokens, symbol runs stay together
    "12345 1,000.50 3.14159 0x1F 1e-9", "C++ a--b x@y.com http://example.com/a?b=c&d=e #tag", "!!!???... ___ ---",
    "fish &amp; chips &lt;3 &#39; &quot;", "(((masterpiece))), [[best quality]], {a|b|c}, <lora:x:0.8>",
    # control characters, private use, noncharacters, astral planes
    "\x00\x01\x7f a \x80\x9f", "\ue000\uf8ff \U000f0000 \ufffd \uffff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 𓀀",
    # one long word (BPE on many symbols) and repetition
    "supercalifragilisticexpialidocious" * 3, "a" * 200, "the " * 100,
]


@pytest.fixture(scope="module")
def tokenizer_folder():
    return ensure_fixture("tiny-sd1") / "tokenizer"


@pytest.fixture(scope="module")
def ours(tokenizer_folder):
    return Tokenizer.from_folder(tokenizer_folder)


@pytest.fixture(scope="module")
def reference(tokenizer_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder))


def reference_ids(reference, texts: list[str]) -> np.ndarray:
    return np.array(reference(texts, padding="max_length", max_length=77, truncation=True).input_ids, dtype=np.int64)


def test_canonical_prompt(ours):
    ids = ours(["a photograph of an astronaut riding a horse"])
    expected = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    assert ids[0, :10].tolist() == expected
    assert (ids[0, 10:] == 49407).all()
    assert ours.encode("a photograph of an astronaut riding a horse") == expected


def test_fixture_prompts_match_reference(ours, reference):
    texts = [prompt["text"] for prompt in load_prompts()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ours(texts), reference_ids(reference, texts))


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_strings_match_reference(ours, reference, text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours([text])[0].tolist() == reference_ids(reference, [text])[0].tolist()


def test_code_point_sweep_matches_reference(ours, reference):
    # Each code point alone, between letters, repeated, and after an apostrophe: exercises its
    # whitespace/letter/number class, lower-casing, NFC and byte encoding. Restricted to code points
    # Python's unicodedata knows; later ones (assigned after its Unicode version) may differ, see the
    # module docstring. All of U+0000..U+07FF, then a stride to keep the run to seconds.
    points = [c for c in range(0x110000) if (c < 0x800 or c % 41 == 0) and not 0xD800 <= c < 0xE000
              and unicodedata.category(chr(c)) != "Cn"]
    texts = [f"a{chr(c)}b {chr(c) * 3} x'{chr(c)}" for c in points]
    got, want = ours(texts), reference_ids(reference, texts)
    differing = [hex(points[i]) for i in np.nonzero((got != want).any(axis=1))[0]]
    assert not differing, f"{len(differing)} of {len(points)} code points differ: {differing[:20]}"


def test_over_long_prompt_is_truncated_with_a_warning(ours, reference):
    text = next(p["text"] for p in load_prompts() if p["id"] == "long")
    untruncated = len(reference(text).input_ids)
    assert untruncated > 77
    with pytest.warns(UserWarning, match=f"last {untruncated - 77} of its {untruncated - 2} tokens are dropped"):
        ids = ours.encode(text)
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert ids == reference_ids(reference, [text])[0].tolist()


def test_truncation_boundary(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ours.encode("a " * 75)) == 77  # exactly fills the context: no warning
    with pytest.warns(UserWarning, match="last 1 of its 76 tokens"):
        ours.encode("a " * 76)


def test_bad_input(tmp_path, ours, tokenizer_folder):
    with pytest.raises(ModelInputError, match="list of prompts"):
        ours("a single string")
    (tmp_path / "vocab.json").write_text((tokenizer_folder / "vocab.json").read_text())
    with pytest.raises(ModelInputError, match="merges.txt does not exist"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ModelInputError, match="line 2"):
        Tokenizer.from_folder(tmp_path)
