"""`parity convert`: every tiny fixture to the original single file (.safetensors and .ckpt) and back, losslessly;
the .ckpt holds tensors only and loads in diffusers; what cannot be converted says why."""
import json
import pickletools
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sd_parity.cli import main
from sd_parity.fixtures import ensure_fixture
from sd_parity.impl.ldm_keys import COMPONENTS, POSITION_IDS
from sd_parity.impl.tensor_files import open_component, open_tensor_file

TINY = ("tiny-sd1", "tiny-sd1-inpaint")
# What torch.save emits for a dict of tensors; torch.load(weights_only=True) allows exactly such globals.
TENSOR_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage",
                  "torch LongStorage"}


def _configs_only(source: Path, target: Path, drop=("*.safetensors", "*.bin", "tokenizer")) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*drop))
    return target


def _assert_same_model(a: Path, b: Path) -> None:
    for component in COMPONENTS:
        ours, theirs = open_component(a / component), open_component(b / component)
        assert set(ours) == set(theirs), component
        for name, array in ours.items():
            assert theirs[name].dtype == array.dtype and np.array_equal(theirs[name], array), name
        assert json.loads((a / component / "config.json").read_text()) == \
            json.loads((b / component / "config.json").read_text())


@pytest.mark.parametrize("fixture", TINY)
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_fixture_to_single_file_and_back_is_lossless(tmp_path, fixture, fmt):
    source = ensure_fixture(fixture)
    single = tmp_path / f"model.{fmt}"
    assert main(["convert", fixture, "--to", "ldm", "--format", fmt, "-o", str(single)]) == 0
    tensors = open_tensor_file(single)
    assert "model.diffusion_model.input_blocks.0.0.weight" in tensors
    assert np.array_equal(tensors[POSITION_IDS], np.arange(77)[None])
    assert main(["convert", str(single), "--to", "diffusers", "--config", str(source), "-o",
                 str(tmp_path / "back")]) == 0
    _assert_same_model(source, tmp_path / "back")


def test_ckpt_is_a_state_dict_of_tensors_only(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.ckpt"
    assert main(["convert", "tiny-sd1", "--to", "ldm", "-o", str(path)]) == 0
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found = {arg for op, arg, _ in pickletools.genops(pickled) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    found |= {f"{a} {b}" for a, b in _stack_globals(pickled)}
    assert {g for g in found if g is not None} <= TENSOR_GLOBALS
    state = torch.load(path, weights_only=True)  # the safe loader every careful port uses
    assert list(state) == ["state_dict"]
    safetensors_twin = tmp_path / "model.safetensors"
    assert main(["convert", "tiny-sd1", "--to", "ldm", "-o", str(safetensors_twin)]) == 0
    twin = open_tensor_file(safetensors_twin)
    assert list(state["state_dict"]) == list(twin)
    for name, tensor in state["state_dict"].items():
        assert np.array_equal(tensor.numpy(), twin[name]), name


def _stack_globals(pickled: bytes):
    """(module, name) pairs of STACK_GLOBAL opcodes (protocol 4+), which take their strings from the stack."""
    strings = []
    for op, arg, _ in pickletools.genops(pickled):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            yield strings[-2], strings[-1]


@pytest.mark.parametrize("fixture", TINY)
def test_diffusers_loads_our_ckpt(tmp_path, fixture):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    source = ensure_fixture(fixture)
    path = tmp_path / "model.ckpt"
    assert main(["convert", fixture, "--to", "ldm", "-o", str(path)]) == 0
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(_configs_only(source, tmp_path / "cfg")),
                                                    local_files_only=True, safety_checker=None)
    for component in COMPONENTS:
        theirs = {k: v for k, v in getattr(pipe, component).state_dict().items() if "position_ids" not in k}
        ours = open_component(source / component)
        if component == "text_encoder":
            ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
        assert set(theirs) == set(ours), component
        assert all(np.array_equal(theirs[k].numpy(), v) for k, v in ours.items()), component


def test_to_diffusers_writes_the_shipped_tokenizer_when_the_config_has_none(tmp_path):
    source = ensure_fixture("tiny-sd1")
    single = tmp_path / "model.safetensors"
    assert main(["convert", "tiny-sd1", "--to", "ldm", "-o", str(single)]) == 0
    configs = _configs_only(source, tmp_path / "configs")
    assert main(["convert", str(single), "--to", "diffusers", "--config", str(configs), "-o", str(tmp_path / "out")]) == 0
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "out" / "tokenizer" / name).read_bytes() == (source / "tokenizer" / name).read_bytes()
    _assert_same_model(source, tmp_path / "out")


def test_what_cannot_be_converted_says_why(tmp_path, capsys):
    source = ensure_fixture("tiny-sd1")
    single = tmp_path / "model.safetensors"
    assert main(["convert", "tiny-sd1", "--to", "ldm", "-o", str(single)]) == 0
    cases = [
        (["convert", str(single), "--to", "diffusers", "-o", str(tmp_path / "a")],
         "width 32 is not a multiple of SD 1.x's 64-wide heads"),
        (["convert", str(single), "--to", "ldm"], "is not a folder; --to ldm converts a diffusers model folder"),
        (["convert", "tiny-sd1", "--to", "ldm", "-o", str(single)], "exists; remove it or choose another name"),
        (["convert", "tiny-sd1", "--to", "ldm", "--format", "ckpt", "-o", str(tmp_path / "m.safetensors")],
         "contradicts --format ckpt"),
        (["convert", "no-such-model", "--to", "ldm"], "does not exist (nor is it a fixture"),
    ]
    sd2 = _configs_only(source, tmp_path / "sd2", drop=())
    for component, field in (("unet", {"use_linear_projection": True}), ("text_encoder", {"hidden_act": "gelu"})):
        config = json.loads((sd2 / component / "config.json").read_text())
        (sd2 / component / "config.json").write_text(json.dumps({**config, **field}))
    cases.append((["convert", str(sd2), "--to", "ldm", "-o", str(tmp_path / "sd2.ckpt")],
                  "an OpenCLIP text encoder (SD 2.x)"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "a").exists() and not (tmp_path / "sd2.ckpt").exists()
