"""Fuzzing the run-file reader: whatever an HDF5 file holds, RunReader either refuses it with a RunFileError
(exit 2 on the command line) or reads every tensor it lists with exactly the listed shape and dtype."""
import json
import string

import h5py
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fuzzing  # noqa: F401 - the budget
from crafted import small_tensors, write_run
from sd_parity.cli import main
from sd_parity.errors import RunFileError
from sd_parity.runs import hdf5
from sd_parity.runs.hdf5 import COMPONENTS, RunReader, storage_dtype

pytestmark = pytest.mark.fuzz

TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8)  # h5py's limits
NAMES = st.text(string.ascii_letters + "._@#[]0123456789\x1b\n\u202e", min_size=1, max_size=12)
SCALARS = st.one_of(st.integers(-2, 3), st.floats(allow_nan=True), TEXT, st.binary(max_size=8).filter(lambda b: b"\0" not in b),
                    st.booleans(), st.sampled_from(["sd-parity-run", "float32", "output", "input", "{}", "[]"]))
ATTRIBUTE = st.one_of(SCALARS, st.lists(st.integers(0, 3), min_size=1, max_size=3), st.just(None))
DTYPES = st.sampled_from(["float32", "float16", "float64", "int64", "uint8", "bool", "uint16", "int8", "S3"])


def _set(attrs, name, value) -> None:
    if value is None:
        attrs.pop(name, None)
    else:
        attrs[name] = value


def read_everything(path) -> None:
    """The property: refused as bad input, or every listed tensor reads as listed."""
    hdf5._EXAMINED.clear()
    try:
        reader = RunReader(path)
    except RunFileError as exc:
        assert str(exc)
        return
    with reader:
        for entry in reader.entries():
            assert entry.component in COMPONENTS
            value = reader.read(entry)
            assert value.shape == entry.shape
            assert value.nbytes == entry.nbytes
            assert value.dtype.itemsize == storage_dtype(entry.dtype).itemsize


@given(root=st.dictionaries(st.sampled_from(["format", "format_version", "complete", "metadata"]), ATTRIBUTE),
       tensors=st.lists(st.tuples(st.sampled_from([*COMPONENTS, "lora"]),
                                  st.sampled_from(["main", "step_000", "call_0", "step_1", "x"]), NAMES, DTYPES,
                                  st.lists(st.integers(0, 3), max_size=3),
                                  st.dictionaries(st.sampled_from(["order", "dtype", "kind", "layout"]), ATTRIBUTE)),
                        max_size=5),
       index=st.one_of(st.none(), st.just("keep"), TEXT, st.recursive(
           st.integers(), lambda inner: st.lists(inner, max_size=4), max_leaves=10)))
def test_structured_run_files(tmp_path_factory, root, tensors, index):
    path = write_run(tmp_path_factory.mktemp("fuzz") / "run.h5")
    with h5py.File(path, "a") as file:
        for name, value in root.items():
            _set(file.attrs, name, value)
        for component, invocation, name, dtype, shape, attrs in tensors:
            key = f"{component}/{invocation}/{name.replace('/', '_')}"
            if key in file:
                continue
            try:
                dataset = file.create_dataset(key, data=np.zeros(shape, dtype=dtype))
            except (ValueError, TypeError, OSError):  # HDF5 cannot make it (a name such as "."): nothing to read
                continue
            dataset.attrs.update({"order": np.int64(len(file)), "dtype": dtype, "kind": "output"})
            for attr, value in attrs.items():
                _set(dataset.attrs, attr, value)
        if index != "keep":
            del file["index"]
            if index is not None:
                file["index"] = index if isinstance(index, str) else json.dumps(index)
    read_everything(path)


@given(data=st.data())
def test_corrupted_bytes(tmp_path_factory, data):
    """Byte-level damage: HDF5 itself may loop or crash on it, which the examination's child process turns
    into a RunFileError too."""
    compression = data.draw(st.sampled_from([None, "gzip", "lzf"]))
    folder = tmp_path_factory.mktemp("bytes")
    raw = bytearray(write_run(folder / "good.h5", small_tensors(), compression=compression).read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    path = folder / "bad.h5"
    path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    read_everything(path)


@given(metadata=st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=5),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                         max_size=3),
                             max_leaves=30))
def test_metadata_of_any_shape_reaches_every_output(tmp_path_factory, capsys, metadata):
    """Metadata is free-form: whatever JSON a port records, compare, its reports and inspect cope."""
    folder = tmp_path_factory.mktemp("meta")
    run = write_run(folder / "run.h5")
    with h5py.File(run, "a") as file:
        file.attrs["metadata"] = json.dumps({"prompt": metadata, "versions": metadata, "mode": metadata,
                                             "seed": metadata, "x": metadata})
    hdf5._EXAMINED.clear()
    assert main(["compare", str(run), str(run), "--output-dir", str(folder / "out")]) == 0
    assert main(["inspect", str(run)]) == 0
    capsys.readouterr()
