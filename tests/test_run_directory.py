"""Runs as folders of .npy / .safetensors files: round trips, foreign writers, untrusted input, and the
commands (compare, inspect, validate, import, export, export-inputs) reading either form."""
import json
import os

import h5py
import ml_dtypes
import numpy as np
import pytest

from sd_parity.cli import main
from sd_parity.impl.tensor_files import write_safetensors
from sd_parity.judging.compare import compare_runs
from sd_parity.runs.directory import DirectoryRunReader, DirectoryRunWriter, scan, validate_directory
from sd_parity.runs.limits import Limits
from sd_parity.runs.hdf5 import RunFileError, RunReader, RunWriter, validate
from sd_parity.runs.open import copy_run, open_run, validate_run

RNG = np.random.default_rng(0)
SAMPLE = {
    ("pipeline", "main", "x_T"): RNG.standard_normal((1, 4, 8, 8)).astype(np.float32),
    ("unet", "step_000", "@sample"): RNG.standard_normal((2, 4, 8, 8)).astype(np.float32),
    ("unet", "step_000", "conv_in"): RNG.standard_normal((2, 8, 8, 8)).astype(np.float16),
    ("unet", "step_000", "down_blocks.0[1][0]"): RNG.standard_normal((2, 8)).astype(ml_dtypes.bfloat16),
    ("unet", "step_001", "mid_block@temb"): RNG.standard_normal(3).astype(np.float64),
    ("text_encoder", "call_0", "@input_ids"): RNG.integers(0, 49407, (1, 77)),
    ("pipeline", "step_000", "timestep"): np.array([981], np.int64),
    ("pipeline", "main", "image_uint8"): RNG.integers(0, 255, (1, 8, 8, 3), dtype=np.uint8),
}
LAYOUTS = {("unet", "step_000", "@sample"): "channels_last"}


def write_sample(writer):
    with writer:
        for key, value in SAMPLE.items():
            writer.write(*key, value, layout=LAYOUTS.get(key))
    return writer.path


def assert_holds_sample(reader, metadata=None):
    entries = reader.entries()
    assert [(e.component, e.invocation, e.name) for e in entries] == list(SAMPLE)
    assert [e.order for e in entries] == list(range(len(SAMPLE)))
    for entry, expected in zip(entries, SAMPLE.values()):
        value = reader.read(entry)
        assert value.dtype == expected.dtype and value.shape == expected.shape, entry.key
        assert np.array_equal(value.view(np.uint8), np.ascontiguousarray(expected).view(np.uint8)), entry.key
        assert entry.layout == LAYOUTS.get((entry.component, entry.invocation, entry.name))
    assert reader.read("unet/step_000/@sample", restore_layout=True).strides[1] == 4  # channels innermost again
    if metadata is not None:
        assert reader.metadata == metadata


@pytest.mark.parametrize("tensor_format", ["npy", "safetensors"])
def test_directory_round_trip_keeps_values_dtypes_order_layouts_metadata(tmp_path, tensor_format):
    path = write_sample(DirectoryRunWriter(tmp_path / "run", {"prompt": "p", "seed": 1}, tensor_format=tensor_format))
    assert validate_directory(path) == [] and validate_run(path) == []
    with open_run(path) as reader:
        assert isinstance(reader, DirectoryRunReader) and reader.order_source == "run.json"
        assert_holds_sample(reader, {"prompt": "p", "seed": 1})
        assert reader.components() == ["pipeline", "text_encoder", "unet"]
        assert reader.entry("unet/step_001/mid_block@temb").kind == "input"
    suffix = ".npy" if tensor_format == "npy" else ".safetensors"
    assert (path / "unet" / "step_000" / f"conv_in{suffix}").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_then_import_reproduces_the_run_file(tmp_path):
    source = write_sample(RunWriter(tmp_path / "run.h5", {"seed": 1}))
    assert main(["export", str(source), "-o", str(tmp_path / "dir")]) == 0
    assert main(["import", str(tmp_path / "dir"), "-o", str(tmp_path / "back.h5")]) == 0
    assert validate(tmp_path / "back.h5") == []
    with RunReader(tmp_path / "back.h5") as reader:
        assert_holds_sample(reader, {"seed": 1})
    assert main(["export", str(source), "-o", str(tmp_path / "dir"), "--format", "safetensors"]) == 0  # replaces
    with open_run(tmp_path / "dir") as reader:
        assert_holds_sample(reader, {"seed": 1})
    assert not list((tmp_path / "dir").rglob("*.npy"))


def test_a_failed_write_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with DirectoryRunWriter(tmp_path / "run", {}) as writer:
            writer.write("unet", "step_000", "a", np.zeros(3, np.float32))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    with pytest.raises(RunFileError, match="not a run folder"):
        DirectoryRunWriter(tmp_path / "mine", {})


def test_plain_npy_files_with_order_prefixes_need_no_manifest(tmp_path):
    # What a port writes with nothing but np.save / a 20-line .npy writer: no run.json at all.
    for order, ((component, invocation, name), value) in enumerate(SAMPLE.items()):
        folder = tmp_path / "run" / component / invocation
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{order:04d}__{name}.npy", value)  # NumPy stores bfloat16 as a 2-byte void
    with open_run(tmp_path / "run") as reader:
        assert reader.order_source == "file names" and reader.metadata == {}
        assert [(e.component, e.invocation, e.name) for e in reader.entries()] == list(SAMPLE)
        assert reader.entry("unet/step_000/down_blocks.0[1][0]").dtype == "bfloat16"
    bits = tmp_path / "run" / "unet" / "step_000" / "0003__down_blocks.0[1][0].npy"
    np.save(bits, SAMPLE[("unet", "step_000", "down_blocks.0[1][0]")].view(np.uint16))
    assert "uint16 is not a run dtype; for bfloat16 stored as its bits, declare" in _problems(tmp_path / "run")


def test_without_any_order_tensors_are_listed_by_key(tmp_path):
    for (component, invocation, name), value in SAMPLE.items():
        folder = tmp_path / "run" / component / invocation
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{name}.npy", np.asfortranarray(value.astype(np.float32)))
    with open_run(tmp_path / "run") as reader:
        assert reader.order_source == "key order"
        keys = [e.key for e in reader.entries()]
        assert keys == sorted("/".join(k) for k in SAMPLE)
        x_t = reader.read("pipeline/main/x_T")
        assert x_t.flags.c_contiguous and np.array_equal(x_t, SAMPLE[("pipeline", "main", "x_T")])


def test_safetensors_files_holding_many_tensors_written_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import save_file

    run = tmp_path / "run"
    run.mkdir()
    floats = {"/".join(k): v for k, v in SAMPLE.items() if v.dtype in (np.float32, np.float16, np.float64)}
    others = {"/".join(k): v for k, v in SAMPLE.items() if "/".join(k) not in floats}
    (run / "unet").mkdir()
    save_file(floats, str(run / "floats.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in others.items() if v.dtype != ml_dtypes.bfloat16},
              str(run / "ints.safetensors"))
    bf16_key = "unet/step_000/down_blocks.0[1][0]"
    write_safetensors(run / "unet" / "bf16.safetensors", {bf16_key: SAMPLE[tuple(bf16_key.split("/"))]})  # BF16
    listing = ["/".join(k) if k not in LAYOUTS else {"key": "/".join(k), "layout": LAYOUTS[k]} for k in SAMPLE]
    (run / "run.json").write_text(json.dumps({"format": "sd-parity-run", "format_version": 1,
                                              "metadata": {"impl": "my-port"}, "tensors": listing}))
    with open_run(run) as reader:
        assert_holds_sample(reader, {"impl": "my-port"})


def test_compare_reads_either_form_with_the_same_result(tmp_path, impl_run):
    reference, candidate = impl_run("torch", steps=2, negative_prompt="blurry")
    assert main(["export", str(candidate), "-o", str(tmp_path / "cand")]) == 0
    assert main(["export", str(reference), "-o", str(tmp_path / "ref"), "--format", "safetensors"]) == 0
    from_files = compare_runs(reference, candidate)
    from_folders = compare_runs(tmp_path / "ref", tmp_path / "cand")
    assert from_files.coverage.counts == from_folders.coverage.counts
    assert from_files.coverage.counts["pass"] > 500 and from_files.coverage.counts["missing"] == 0
    for a, b in zip(from_files.results, from_folders.results):
        assert (a.key, a.status) == (b.key, b.status)
        assert a.metrics == b.metrics
    assert main(["compare", str(tmp_path / "ref"), str(tmp_path / "cand"), "--output-dir", str(tmp_path / "out"),
                 "--quiet"]) == 0
    assert main(["inspect", str(tmp_path / "cand")]) == 0
    assert main(["validate", str(tmp_path / "cand")]) == 0


def test_export_inputs_writes_each_invocations_inputs_of_one_block(tmp_path, capsys, impl_run):
    reference, _ = impl_run("numpy", steps=2, negative_prompt="blurry")
    out = tmp_path / "inputs"
    assert main(["export-inputs", str(reference), "--block", "unet.down_blocks.1", "--out", str(out)]) == 0
    with RunReader(reference) as ref, open_run(out) as exported:
        keys = [e.key for e in exported.entries()]
        assert keys == [f"unet/step_{s:03d}/down_blocks.1@{a}" for s in range(2)
                        for a in ("hidden_states", "temb", "encoder_hidden_states")]
        for key in keys:
            assert np.array_equal(exported.read(key), ref.read(key))
        expected = exported.metadata["expected_outputs"]
        assert [name for name, _, _ in expected] == ["down_blocks.1[0]", "down_blocks.1[1][0]", "down_blocks.1[1][1]",
                                                     "down_blocks.1[1][2]"]
        assert expected[0][1] == list(ref.entry("unet/step_000/down_blocks.1[0]").shape)
    assert main(["export-inputs", str(reference), "--block", "unet.down_blocks.7", "--out", str(tmp_path / "x")]) == 2
    assert "blocks with inputs: unet, unet.down_blocks.0" in capsys.readouterr().err
    assert main(["export-inputs", str(reference), "--block", "nope.x", "--out", str(tmp_path / "x")]) == 2


# --- untrusted folders -----------------------------------------------------------------------------
def _folder(tmp_path, files: dict[str, np.ndarray] | None = None, manifest: dict | None = None):
    run = tmp_path / "run"
    for relative, value in (files or {"unet/step_000/a.npy": np.zeros(3, np.float32)}).items():
        (run / relative).parent.mkdir(parents=True, exist_ok=True)
        np.save(run / relative, value, allow_pickle=True)
    if manifest is not None:
        (run / "run.json").write_text(json.dumps(manifest))
    return run


def _problems(run, limits=Limits()):
    return "\n".join(scan(run, limits).problems)


def test_links_leaving_the_folder_are_refused(tmp_path):
    run = _folder(tmp_path)
    secret = tmp_path / "secret.npy"
    np.save(secret, np.ones(3, np.float32))
    os.symlink(secret, run / "unet" / "step_000" / "b.npy")
    assert "links outside the run folder" in _problems(run)
    os.unlink(run / "unet" / "step_000" / "b.npy")
    os.symlink(run / "unet" / "step_000" / "a.npy", run / "unet" / "step_000" / "b.npy")  # inside: followed
    assert _problems(run) == ""
    os.symlink(tmp_path, run / "unet" / "step_001")
    assert "links to folders are not followed" in _problems(run)
    with pytest.raises(RunFileError, match="not a valid run folder"):
        DirectoryRunReader(run)
    assert main(["validate", str(run)]) == 2


@pytest.mark.parametrize("files, message", [
    ({"unet/step_000/x/deep.npy": np.zeros(1)}, "nested deeper"),
    ({"unet/a.npy": np.zeros(1)}, "goes in <component>/<invocation>/<name>.npy"),
    ({"vae/call_0/a.npy": np.zeros(1)}, "unknown component 'vae'"),
    ({"unet/step_1/a.npy": np.zeros(1)}, "bad invocation 'step_1'"),
    ({"unet/step_000/a.npy": np.array([{"x": 1}], dtype=object)}, "dtype object is not a run dtype"),
    ({"unet/step_000/a.npy": np.zeros(2, np.complex64)}, "dtype complex64 is not a run dtype"),
    ({"unet/step_000/a.npy": np.zeros(2, [("x", "<f4")])}, "is not a run dtype"),
    ({"unet/step_000/0001__a.npy": np.zeros(1), "unet/step_000/b.npy": np.zeros(1)}, "lack the <order>__ prefix"),
    ({"unet/step_000/0001__a.npy": np.zeros(1), "unet/step_000/0001__b.npy": np.zeros(1)}, "order 1 is used by"),
])
def test_bad_files_are_named(tmp_path, files, message):
    assert message in _problems(_folder(tmp_path, files))


def test_truncated_and_foreign_files_are_named(tmp_path):
    run = _folder(tmp_path, {"unet/step_000/a.npy": np.zeros((4, 4), np.float32)})
    path = run / "unet" / "step_000" / "a.npy"
    path.write_bytes(path.read_bytes()[:-8])
    (run / "unet" / "notes.txt").write_text("hello")
    (run / ".DS_Store").write_bytes(b"\0")  # file browsers' litter is ignored
    (run / "unet" / "step_000" / "b.safetensors").write_bytes(b"\xff" * 4)
    problems = _problems(run)
    assert "truncated or padded" in problems and "notes.txt: not a tensor file" in problems
    assert "b.safetensors: not a readable safetensors file" in problems and ".DS_Store" not in problems
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither run.json nor tensor files" in _problems(empty)


@pytest.mark.parametrize("manifest, message", [
    ({"format": "other", "format_version": 1}, "format is 'other'"),
    ({"format": "sd-parity-run", "format_version": 2}, "format_version is 2"),
    ({"format": "sd-parity-run", "format_version": 1, "complete": False}, "did not finish"),
    ({"format": "sd-parity-run", "format_version": 1, "metadata": []}, "metadata must be a JSON object"),
    ({"format": "sd-parity-run", "format_version": 1, "tensors": ["unet/step_000/a", "unet/step_000/zz"]},
     "lists unet/step_000/zz, which is not stored"),
    ({"format": "sd-parity-run", "format_version": 1, "tensors": []}, "missing from run.json's tensors list"),
    ({"format": "sd-parity-run", "format_version": 1, "tensors": ["unet/step_000/a", "unet/step_000/a"]}, "twice"),
    ({"format": "sd-parity-run", "format_version": 1, "tensors": [{"key": "unet/step_000/a", "dtype": "int8"}]},
     "says dtype 'int8'"),
    ({"format": "sd-parity-run", "format_version": 1, "tensors": [{"key": "unet/step_000/a", "layout": "nhwc"}]},
     "layout may only be channels_last"),
    ({"format": "sd-parity-run", "format_version": 1, "metadata": {"a": [[[[[[[[1]]]]]]]]}}, "more than the limit of 6"),
])
def test_bad_manifests_are_named(tmp_path, manifest, message):
    assert message in _problems(_folder(tmp_path, manifest=manifest), Limits(metadata_depth=6))


def test_limits_bound_what_a_folder_may_hold(tmp_path):
    run = _folder(tmp_path, {"unet/step_000/a.npy": np.zeros((2,) * 5, np.float32)},
                  manifest={"format": "sd-parity-run", "format_version": 1})
    assert _problems(run) == ""
    assert "run.json is" in _problems(run, Limits(index_bytes=10))
    assert "5 dimensions, more than the limit of 4" in _problems(run, Limits(ndim=4))
    assert "bad tensor name 'a'" in _problems(run, Limits(name_length=0))
    (run / "run.json").write_text("[" * 100000 + "]" * 100000)
    assert "run.json is nested too deeply to parse" in _problems(run)


# --- HDF5 from other languages ---------------------------------------------------------------------
def _fixed(value: str, pad=h5py.h5t.STR_NULLPAD, size: int | None = None):
    """A fixed-length string attribute as C and Fortran HDF5 libraries write it (bytes, padded)."""
    raw = value.encode("latin-1" if "\xe9" in value else "utf-8")
    size = size or len(raw) + 3
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(size)
    tid.set_strpad(pad)
    return tid, np.array(raw.ljust(size, b" " if pad == h5py.h5t.STR_SPACEPAD else b"\0"), dtype=f"S{size}")


def _set(obj, name: str, value: str, pad=h5py.h5t.STR_NULLPAD):
    tid, data = _fixed(value, pad)
    attr = h5py.h5a.create(obj.id, name.encode(), tid, h5py.h5s.create(h5py.h5s.SCALAR))
    attr.write(data, mtype=tid)


def test_hdf5_with_fixed_length_string_attributes_is_accepted(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as file:
        _set(file, "format", "sd-parity-run", h5py.h5t.STR_SPACEPAD)  # Fortran pads with spaces
        file.attrs["format_version"] = np.array([1], np.int32)  # one-element arrays, as many C writers do
        _set(file, "metadata", json.dumps({"impl": "caf\xe9-port"}))  # not UTF-8: Latin-1 bytes
        file.attrs["complete"] = np.array([1], np.int8)
        for order, ((component, invocation, name), value) in enumerate(SAMPLE.items()):
            stored = value.view(np.uint16) if value.dtype == ml_dtypes.bfloat16 else value
            dataset = file.create_dataset(f"{component}/{invocation}/{name}", data=stored)
            dataset.attrs["order"] = np.array([order], np.int32)
            _set(dataset, "dtype", "bfloat16" if value.dtype == ml_dtypes.bfloat16 else value.dtype.name)
            _set(dataset, "kind", "input" if "@" in name else "pipeline" if component == "pipeline" else "output",
                 h5py.h5t.STR_SPACEPAD)
            if (component, invocation, name) in LAYOUTS:
                _set(dataset, "layout", "channels_last")
    assert validate(path) == []
    with open_run(path) as reader:
        assert_holds_sample(reader, {"impl": "caf\xe9-port"})
        with DirectoryRunWriter(tmp_path / "dir", reader.metadata) as writer:
            copy_run(reader, writer)
    assert main(["validate", str(path)]) == 0 and main(["validate", str(tmp_path / "dir")]) == 0
