"""The run file: round trip, dtypes, atomic writing, validation."""
import errno
import json

import h5py
import ml_dtypes
import numpy as np
import pytest

from sd_parity.errors import OutputError
from sd_parity.runs.hdf5 import RunFileError, RunReader, RunWriter, validate


def _write_sample(path, **kwargs):
    rng = np.random.default_rng(0)
    tensors = {
        ("pipeline", "main", "x_T"): rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        ("unet", "step_000", "conv_in"): rng.standard_normal((2, 8, 8, 8)).astype(np.float16),
        ("unet", "step_000", "down_blocks.0[1][0]"): rng.standard_normal((2, 8)).astype(ml_dtypes.bfloat16),
        ("unet", "step_001", "mid_block@temb"): rng.standard_normal(3).astype(np.float64),
        ("pipeline", "main", "image_uint8"): rng.integers(0, 255, (1, 8, 8, 3), dtype=np.uint8),
    }
    with RunWriter(path, {"prompt": "p", "seed": 1}, **kwargs) as writer:
        for (component, invocation, name), value in tensors.items():
            writer.write(component, invocation, name, value)
    return tensors


@pytest.mark.parametrize("compression, background", [(None, 0), ("gzip", 0), ("lzf", 0), (None, 1 << 20), (None, 1)])
def test_round_trip_keeps_values_dtypes_and_order(tmp_path, compression, background):
    path = tmp_path / "run.h5"
    tensors = _write_sample(path, compression=compression, background_bytes=background)
    assert validate(path) == []
    with RunReader(path) as reader:
        assert reader.metadata == {"prompt": "p", "seed": 1}
        entries = reader.entries()
        assert [(e.component, e.invocation, e.name) for e in entries] == list(tensors)
        assert [e.order for e in entries] == list(range(len(tensors)))
        for entry, expected in zip(entries, tensors.values()):
            value = reader.read(entry)
            assert value.dtype == expected.dtype
            assert np.array_equal(value.view(np.uint8), expected.view(np.uint8))
        assert reader.entry("unet/step_001/mid_block@temb").kind == "input"
        assert reader.entry("unet/step_000/conv_in").kind == "output"
        assert reader.components() == ["pipeline", "unet"]
        assert reader.invocations("unet") == ["step_000", "step_001"]


def test_bfloat16_is_stored_as_raw_bits(tmp_path):
    path = tmp_path / "run.h5"
    _write_sample(path)
    with h5py.File(path) as file:
        dataset = file["unet/step_000/down_blocks.0[1][0]"]
        assert dataset.dtype == np.uint16 and dataset.attrs["dtype"] == "bfloat16"


def test_failed_capture_leaves_no_file(tmp_path):
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError):
        with RunWriter(path, {}) as writer:
            writer.write("unet", "step_000", "a", np.zeros(3, np.float32))
            raise RuntimeError("killed")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_file_is_absent_until_close(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, {})
    writer.write("unet", "step_000", "a", np.zeros(3, np.float32))
    assert not path.exists()
    temp = next(tmp_path.iterdir())
    assert any("not marked complete" in p or "not a readable" in p for p in validate(temp))
    writer.close()
    assert path.exists() and validate(path) == []


def test_full_disk_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, {})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", no_space)
    with pytest.raises(OutputError, match="disk is full"):
        writer.write("unet", "step_000", "a", np.zeros(3, np.float32))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_background_write_errors_reach_the_capturing_thread(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = RunWriter(path, {}, background_bytes=1 << 20)
    monkeypatch.setattr(h5py.Group, "create_dataset", no_space)
    writer.write("unet", "step_000", "a", np.zeros(3, np.float32))
    with pytest.raises(OutputError, match="disk is full"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_background_writes_copy_the_tensor(tmp_path):
    path = tmp_path / "run.h5"
    value = np.zeros(4, np.float32)
    with RunWriter(path, {}, background_bytes=1 << 20) as writer:
        writer.write("unet", "step_000", "a", value)
        value += 1  # the model may reuse its buffer right after the hook returns
    with RunReader(path) as reader:
        assert (reader.read("unet/step_000/a") == 0).all()


@pytest.mark.parametrize("component, invocation, name, message", [
    ("nope", "main", "a", "unknown component"),
    ("unet", "step_1", "a", "bad invocation"),
    ("unet", "step_000", "a/b", "no '/'"),
    ("unet", "step_000", "", "non-empty"),
])
def test_writer_rejects_bad_names(tmp_path, component, invocation, name, message):
    with RunWriter(tmp_path / "run.h5", {}) as writer:
        with pytest.raises(RunFileError, match=message):
            writer.write(component, invocation, name, np.zeros(1, np.float32))


def test_writer_rejects_duplicates_and_bad_output_folder(tmp_path):
    with RunWriter(tmp_path / "run.h5", {}) as writer:
        writer.write("unet", "step_000", "a", np.zeros(1, np.float32))
        with pytest.raises(RunFileError, match="written twice"):
            writer.write("unet", "step_000", "a", np.zeros(1, np.float32))
    with pytest.raises(OutputError, match="does not exist"):
        RunWriter(tmp_path / "missing" / "run.h5", {})


def test_validator_names_each_problem(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as file:
        file.attrs["format"] = "other"
        file.attrs["format_version"] = 7
        file.attrs["metadata"] = "not json"
        dataset = file.create_dataset("unet/step_000/x", data=np.zeros(2, np.float32))
        dataset.attrs["order"] = 0
        dataset.attrs["dtype"] = "float16"
        dataset.attrs["kind"] = "output"
        file.create_dataset("unet/step_000/y", data=np.zeros(2, np.float32)).attrs["order"] = 0
        file.create_dataset("weird/main/z", data=np.zeros(1))
    problems = validate(path)
    text = "\n".join(problems)
    for expected in ("format is 'other'", "format_version is 7", "not marked complete", "metadata is not valid JSON",
                     "stored as float32, expected float16", "missing attribute 'dtype'", "order 0 also used",
                     "/weird: unknown component"):
        assert expected in text, expected
    with pytest.raises(RunFileError, match="not a valid run file"):
        RunReader(path)


def test_validator_reports_truncated_file(tmp_path):
    path = tmp_path / "run.h5"
    _write_sample(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert validate(path) and "not a readable HDF5 file" in validate(path)[0]


def test_metadata_is_json(tmp_path):
    path = tmp_path / "run.h5"
    _write_sample(path)
    with h5py.File(path) as file:
        assert json.loads(file.attrs["metadata"])["seed"] == 1


def test_index_lists_every_tensor_and_the_validator_checks_it(tmp_path):
    path = tmp_path / "run.h5"
    _write_sample(path)
    with h5py.File(path, "r") as file:
        indexed = json.loads(file["index"][()])
    assert [row[2] for row in indexed] == ["x_T", "conv_in", "down_blocks.0[1][0]", "mid_block@temb", "image_uint8"]
    with h5py.File(path, "a") as file:
        del file["index"]
        file.create_dataset("index", data=json.dumps(indexed[:-1]))
    assert any("omits pipeline/main/image_uint8" in p for p in validate(path))


def test_files_without_an_index_are_read_by_scanning(tmp_path):
    path = tmp_path / "run.h5"
    tensors = _write_sample(path)
    with h5py.File(path, "a") as file:
        del file["index"]
    assert validate(path) == []
    with RunReader(path) as reader:
        assert [(e.component, e.invocation, e.name) for e in reader.entries()] == list(tensors)


@pytest.mark.parametrize("shape, itemsize, expected", [
    ((2, 4, 8, 8), 4, (2, 4, 8, 8)),                 # small: one chunk
    ((2, 4096, 2560), 4, (1, 1366, 2560)),           # 84 MB: a third of one sample's rows (1638 fit)
    ((8, 64, 256, 256), 4, (1, 64, 256, 256)),       # exactly 16 MiB per sample
    ((3, 3000, 3000), 2, (1, 1500, 3000)),           # 2 equal parts, not 2796 + 204 rows
])
def test_chunks_stay_under_16_mib(shape, itemsize, expected):
    from sd_parity.runs.hdf5 import CHUNK_BYTES, chunk_shape

    chunk = chunk_shape(shape, itemsize)
    assert chunk == expected
    assert np.prod(chunk) * itemsize <= CHUNK_BYTES


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_large_tensors_read_from_their_file_bytes_equal_hdf5s_read(tmp_path, monkeypatch, compression):
    """Unfiltered tensors of 1 MiB and more are copied straight from the file (chunks cut on one axis or
    several, the last one partly padding); compressed ones, and a contiguous dataset, read the same."""
    from sd_parity.runs import hdf5

    rng = np.random.default_rng(0)
    monkeypatch.setattr(hdf5, "CHUNK_BYTES", 1 << 20)  # several chunks per tensor, at test sizes
    tensors = {"a": rng.standard_normal((2, 1001, 300)).astype(np.float32),  # rows in parts of 501 and 500
               "b": rng.standard_normal((3, 2, 600, 300)).astype(np.float32),  # cut on two axes
               "c": rng.standard_normal((5, 100_003)).astype(ml_dtypes.bfloat16),
               "d": rng.standard_normal(300_000).astype(np.float64)}
    path = tmp_path / "run.h5"
    with RunWriter(path, {}, compression=compression) as writer:
        for name, array in tensors.items():
            writer.write("unet", "step_000", name, array)
    with h5py.File(path, "a") as file:  # a contiguous dataset, as other writers make them
        file.create_dataset("unet/step_000/e", data=tensors["a"] * 2, chunks=None)
        for attr, value in (("order", np.int64(4)), ("dtype", "float32"), ("kind", "output")):
            file["unet/step_000/e"].attrs[attr] = value
        del file["index"]
    tensors["e"] = tensors["a"] * 2
    with RunReader(path) as reader, h5py.File(path) as file:
        for name, array in tensors.items():
            entry = reader.entry(f"unet/step_000/{name}")
            extents = hdf5._extents(h5py.h5d.open(file.id, entry.key.encode()), entry)
            assert (extents is None) == (compression is not None and name != "e")
            assert reader.read(entry).tobytes() == array.tobytes()
            assert reader.read(entry).dtype == array.dtype
