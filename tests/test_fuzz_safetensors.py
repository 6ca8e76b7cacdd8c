"""Fuzzing the safetensors reader (impl/tensor_files.py): it refuses with ModelInputError or reads every
tensor with its declared shape, and it is at least as strict as the safetensors library: whatever the
library refuses, it refuses too."""
import json
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fuzzing  # noqa: F401 - the budget
from sd_parity.impl.errors import ModelInputError
from sd_parity.impl.tensor_files import SAFETENSORS_DTYPES, SafetensorsFile, write_safetensors

safetensors = pytest.importorskip("safetensors")
pytestmark = pytest.mark.fuzz

DTYPE_NAMES = st.sampled_from([*SAFETENSORS_DTYPES, "I8", "F8_E4M3", "Q4", ""])
SIZES = st.integers(0, 3) | st.sampled_from([2**31, 2**62, 2**64 + 1, -1])
ENTRY = st.fixed_dictionaries(
    {"dtype": DTYPE_NAMES, "shape": st.lists(SIZES, max_size=3) | st.text(max_size=3),
     "data_offsets": st.lists(st.integers(-1, 40) | st.sampled_from([2**64 + 3]), min_size=0, max_size=3)},
    optional={"extra": st.integers()})
HEADERS = st.dictionaries(st.text(max_size=4), ENTRY | st.integers() | st.none(), max_size=4).map(
    lambda d: {**d}) | st.builds(lambda tensors, meta: {**tensors, "__metadata__": meta},
                                 st.dictionaries(st.text(max_size=4), ENTRY, max_size=3),
                                 st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers()))


def library_accepts(path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="numpy") as handle:
            list(handle.keys())
        return True
    except Exception:  # noqa: BLE001 - any refusal
        return False


def check(path) -> None:
    try:
        tensors = SafetensorsFile(path)
    except ModelInputError as exc:
        assert str(path) in str(exc)
        return
    assert library_accepts(path), "we accepted a file the safetensors library refuses"
    for name in tensors:
        dtype, shape, begin, end = tensors._entries[name]
        assert tensors[name].shape == shape and tensors[name].nbytes == end - begin


@given(header=HEADERS, data_len=st.integers(0, 48), pad=st.sampled_from([b"", b" ", b"\n", b"x"]),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 10**9]))
def test_structured_headers(tmp_path_factory, header, data_len, pad, length_delta):
    raw = json.dumps(header).encode() + pad
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + bytes(range(data_len)))
    check(path)


@given(data=st.data())
def test_damaged_real_files(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("st")
    good = folder / "good.safetensors"
    write_safetensors(good, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16),
                             "c": np.zeros(0, np.int64)}, metadata={"format": "pt"})
    raw = bytearray(good.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    path = folder / "bad.safetensors"
    path.write_bytes(bytes(raw[:cut]))
    check(path)


def test_the_library_and_we_agree_on_named_defects(tmp_path):
    """Fixed cases of what the library refuses (the fuzzing above finds them at random)."""
    def file(header, data):
        raw = json.dumps(header).encode()
        path = tmp_path / f"f{len(list(tmp_path.iterdir()))}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return path

    cases = {
        "overlap": file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
        "gap": file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
        "past the end": file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
        "trailing data": file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
        "shape overflows": file({"a": {"dtype": "F32", "shape": [2**62, 8], "data_offsets": [0, 0]}}, b""),
        "metadata not strings": file({"__metadata__": {"a": 1}}, b""),
    }
    for name, path in cases.items():
        assert not library_accepts(path), name
        with pytest.raises(ModelInputError):
            SafetensorsFile(path)
    big = tmp_path / "big.safetensors"
    big.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(ModelInputError, match="more than the 100000000 bytes"):
        SafetensorsFile(big)
