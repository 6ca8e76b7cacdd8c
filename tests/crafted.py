"""Run files as a hostile or broken writer makes them: a valid small run, then one defect at a time.

Shared by tests/test_errors.py (one test per defect) and tests/test_fuzz_runfile.py (random defects).
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from sd_parity.runs.hdf5 import RunWriter

KEY = "unet/step_000/conv_in"


def small_tensors(name: str = "conv_in", value=None) -> dict:
    return {("pipeline", "main", "x_T"): np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 4, 4, 4),
            ("unet", "step_000", name): np.arange(16, dtype=np.float32) if value is None else value}


def write_run(path: Path, tensors: dict | None = None, metadata: dict | None = None, **options) -> Path:
    with RunWriter(path, metadata or {"seed": 0}, **options) as writer:
        for (component, invocation, name), value in (tensors or small_tensors()).items():
            writer.write(component, invocation, name, value)
    return path


def _replace_dataset(file: h5py.File, key: str = KEY, **create) -> h5py.Dataset:
    attrs = dict(file[key].attrs)
    del file[key]
    dataset = file.create_dataset(key, **create)
    dataset.attrs.update(attrs)
    return dataset


def _external(file: h5py.File) -> None:
    secret = Path(file.filename).with_name("secret.bin")
    secret.write_bytes(b"SECRET" * 20)
    _replace_dataset(file, shape=(16,), dtype=np.float32, external=[(str(secret), 0, 64)])


def _virtual(file: h5py.File) -> None:
    layout = h5py.VirtualLayout(shape=(16,), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(Path(file.filename).with_name("other.h5")), "data", shape=(16,))
    attrs = dict(file[KEY].attrs)
    del file[KEY]
    file.create_virtual_dataset(KEY, layout).attrs.update(attrs)


def _index(edit):
    def apply(file: h5py.File) -> None:
        rows = json.loads(file["index"][()])
        edit(rows)
        del file["index"]
        file["index"] = json.dumps(rows)
    return apply


def _bomb(file: h5py.File) -> None:
    # 4 TiB of zeros in a few KB of gzip chunks that were never written
    _replace_dataset(file, shape=(1 << 40,), dtype=np.float32, chunks=(1 << 20,), compression="gzip")
    rows = json.loads(file["index"][()])
    rows[1][5] = [1 << 40]
    del file["index"]
    file["index"] = json.dumps(rows)


# defect -> (what it does to a valid file, words the refusal must contain)
DEFECTS = {
    "complete is a string": (lambda f: f.attrs.__setitem__("complete", "yes"), "'complete' is a string"),
    "complete missing": (lambda f: f.attrs.__delitem__("complete"), "not marked complete"),
    "format_version a float": (lambda f: f.attrs.__setitem__("format_version", 1.0), "expected an integer"),
    "format_version 2": (lambda f: f.attrs.__setitem__("format_version", 2), "format_version is 2"),
    "format_version an array": (lambda f: f.attrs.__setitem__("format_version", [1, 1]), "not one"),
    "metadata nested deeply": (lambda f: f.attrs.__setitem__("metadata", "[" * 50_000 + "]" * 50_000), "nested"),
    "metadata too large": (lambda f: f.attrs.__setitem__("metadata", json.dumps({"x": "a" * (2 << 20)})),
                           "more than the limit"),
    "metadata a list": (lambda f: f.attrs.__setitem__("metadata", "[1, 2]"), "not an object"),
    # fixed length and declared UTF-8 (bytes declared ASCII, as C libraries write them, are read as Latin-1)
    "metadata not UTF-8": (lambda f: f.attrs.create("metadata", np.bytes_(b'{"a": "\xff"}'),
                                                    dtype=h5py.string_dtype("utf-8", 12)), "not UTF-8"),
    "metadata not JSON": (lambda f: f.attrs.__setitem__("metadata", "{nope"), "not valid JSON"),
    "dtype attribute lies": (lambda f: f[KEY].attrs.__setitem__("dtype", "float16"),
                             "stored as float32, expected float16"),
    "dtype attribute unknown": (lambda f: f[KEY].attrs.__setitem__("dtype", "complex64"), "not one of"),
    "order is a string": (lambda f: f[KEY].attrs.__setitem__("order", "1"), "expected an integer"),
    "order repeated": (lambda f: f[KEY].attrs.__setitem__("order", np.int64(0)), "order 0 also used"),
    "kind disagrees with the name": (lambda f: f[KEY].attrs.__setitem__("kind", "input"), "kind is 'input'"),
    "layout on a 1-D tensor": (lambda f: f[KEY].attrs.__setitem__("layout", "channels_last"), "layout may only"),
    "index shape lies": (_index(lambda rows: rows[1].__setitem__(5, [1000, 1000])), "disagrees with the dataset"),
    "index order lies": (_index(lambda rows: rows[1].__setitem__(3, 7)), "disagrees with the dataset"),
    "index lists a ghost": (_index(lambda rows: rows.append(["unet", "step_000", "ghost", 9, "float32", [1],
                                                             "output", None])), "which is not stored"),
    "index omits a tensor": (_index(lambda rows: rows.pop()), "omits"),
    "index row malformed": (_index(lambda rows: rows.__setitem__(0, {"a": 1})), "row 0 is not"),
    "external storage": (_external, "external storage"),
    "virtual dataset": (_virtual, "virtual dataset"),
    "soft link": (lambda f: (f.__delitem__(KEY), f.__setitem__(KEY, h5py.SoftLink("/pipeline/main/x_T"))),
                  "soft link"),
    "external link": (lambda f: (f.__delitem__(KEY), f.__setitem__(KEY, h5py.ExternalLink("other.h5", "/x"))),
                      "external link"),
    "compressed bomb": (_bomb, "more than 64 times the file"),
    "data never written": (lambda f: _replace_dataset(f, shape=(16,), dtype=np.float32), "never written"),
    "unknown component": (lambda f: f.create_group("lora"), "unknown component"),
    "bad invocation": (lambda f: f.create_dataset("unet/step_1/x", data=np.zeros(1)), "invocation must be"),
    "null dataspace": (lambda f: _replace_dataset(f, data=h5py.Empty("f4")), "null dataspace"),
}


def defective(path: Path, defect: str) -> Path:
    write_run(path)
    with h5py.File(path, "a") as file:
        DEFECTS[defect][0](file)
    return path
