"""Fuzzing the text a user hands over: `--capture SPEC` and name maps (`--map NAMES.toml`) either parse or
raise their BadInput error; what parses never fails later on any tensor key."""
import string
import tomllib

import pytest
from hypothesis import given, strategies as st

import fuzzing  # noqa: F401 - the budget
from sd_parity.errors import BadInput
from sd_parity.judging.name_map import NameMap, NameMapError, split_key
from sd_parity.runs.hdf5 import COMPONENTS, INVOCATION_RE
from sd_parity.runs.selection import CaptureSpec, CaptureSpecError

pytestmark = pytest.mark.fuzz

TERMS = st.sampled_from(["all", "blocks", "pipeline", "unet", "text_encoder", "glob:", "re:", "steps=", "vae_decoder",
                         "glob:*attn*", "re:(", "re:^down", "steps=0,-1", "steps=2-1", "steps=a", ";", " "])
SPEC = st.lists(TERMS | st.text(max_size=6), max_size=5).map(";".join) | st.text(max_size=20)
KEYS = st.builds(lambda c, i, n: f"{c}/{i}/{n}", st.sampled_from([*COMPONENTS, "x"]),
                 st.sampled_from(["main", "step_000", "call_1", "q"]), st.text(string.printable, max_size=10))


@given(spec=SPEC, names=st.lists(st.tuples(st.sampled_from(COMPONENTS), st.text(max_size=8)), max_size=5),
       total=st.integers(1, 60))
def test_capture_specs(spec, names, total):
    try:
        parsed = CaptureSpec.parse(spec)
    except CaptureSpecError as exc:
        assert isinstance(exc, BadInput) and str(exc)
        return
    for component, name in names:
        assert isinstance(parsed.wants(component, name), bool)
    try:
        parsed.check_steps(total)
    except CaptureSpecError:
        assert parsed.steps is not None
    assert all(isinstance(parsed.wants_step(step, total), bool) for step in range(total))


RULE = st.dictionaries(st.sampled_from(["regex", "glob", "to", "drop", "note", "other"]),
                       st.text(max_size=8) | st.booleans() | st.integers() | st.sampled_from(
                           ["unet/(step_\\d+)/(.*)", "unet/\\1/\\2", "**", "*/*/*", "unet/*/x*", "\\9"]), max_size=4)
MAPS = st.dictionaries(st.sampled_from(["rule", "unmatched", "extra"]),
                       st.lists(RULE, max_size=4) | st.sampled_from(["keep", "drop", "x"]) | RULE, max_size=3)


@given(data=MAPS, keys=st.lists(KEYS, max_size=6))
def test_name_maps(data, keys):
    try:
        name_map = NameMap.from_dict(data)
        mapped = name_map.apply(keys)
    except NameMapError as exc:
        assert isinstance(exc, BadInput) and str(exc)
        return
    for target in mapped.mapping.values():
        component, invocation, name = split_key(target)
        if target not in keys:  # a rule produced it: it must be a valid key
            assert component in COMPONENTS and INVOCATION_RE.match(invocation) and name


@given(text=st.text(max_size=80) | st.lists(st.sampled_from(["[[rule]]\n", "glob = '*'\n", "to = 'unet/main/x'\n",
                                                             "drop = true\n", "regex = '('\n", "unmatched = 1\n",
                                                             "[rule]\n", "x"]), max_size=6).map("".join))
def test_name_map_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("map") / "names.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        NameMap.load(path)
    except NameMapError as exc:
        assert str(exc)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - the property fails here
        raise AssertionError(f"a TOML error escaped as {type(exc).__name__}") from exc
