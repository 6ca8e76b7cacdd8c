"""Weight files, the LDM key map and single-file conversion, checked against diffusers' own loaders."""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from sd_parity.impl import checkpoint
from sd_parity.impl.checkpoint import folder_to_single_file, load_single_file, single_file_to_folder
from sd_parity.impl.errors import ModelInputError
from sd_parity.impl.ldm_keys import COMPONENTS, key_map
from sd_parity.impl.tensor_files import component_weight_files, open_component, open_tensor_file, write_safetensors
from sd_parity.fixtures import FIXTURES, STRESS_SUFFIX, ensure_fixture, fixture_family

TINY = ("tiny-sd1", "tiny-sd1-inpaint")
# What tensor shapes cannot tell about the tiny fixtures; load_single_file fills these with SD 1.5's values.
NOT_INFERRED = {"unet": {"attention_head_dim", "sample_size"}, "vae": {"sample_size"}, "text_encoder": set()}
# What tensor shapes cannot tell: CLIP's head count (width 32 is not a multiple of 64-wide heads) and
# the UNet's GroupNorm group count (tiny-sd1 uses 8, SD uses 32).
TINY_TEXT_HEADS = {"text_encoder": {"num_attention_heads": 4}, "unet": {"norm_num_groups": 8}}


def folder_config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


def memmapped(array: np.ndarray) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    paths = {}
    for name in TINY:
        paths[name] = out / f"{name}.safetensors"
        folder_to_single_file(ensure_fixture(name), paths[name])
    return paths


def reference_shapes(component: str, config: dict) -> dict[str, tuple[int, ...]]:
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        if component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
            model = CLIPTextModel(CLIPTextConfig(**fields))
            return {f"text_model.{k}": tuple(v.shape) for k, v in model.state_dict().items()
                    if "position_ids" not in k}
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# (the stress variants share their base fixture's configs: nothing new to check)
@pytest.mark.parametrize("fixture", [name for name in sorted(FIXTURES)
                                     if fixture_family(name).name == "sd1" and not name.endswith(STRESS_SUFFIX)])
@pytest.mark.parametrize("component", COMPONENTS)
def test_key_map_shapes_are_the_reference_models(fixture, component):
    """The single-file key map is SD 1.x's (SD 2.x and SDXL checkpoints are not converted yet)."""
    config = FIXTURES[fixture][component]
    rules = key_map(component, config)
    assert {name: rule.shape for name, rule in rules.items()} == reference_shapes(component, config)
    assert len({rule.ldm for rule in rules.values()}) == len(rules)


@pytest.mark.parametrize("fixture", TINY)
def test_folder_to_single_file_and_back_is_lossless(tmp_path, single_files, fixture):
    source = ensure_fixture(fixture)
    back = tmp_path / "back"
    single_file_to_folder(single_files[fixture], back, config=source)
    for component in COMPONENTS:
        original, converted = open_component(source / component), open_component(back / component)
        assert list(converted) == list(key_map(component, folder_config(source, component)))
        assert set(original) == set(converted)
        for name, array in original.items():
            assert converted[name].dtype == array.dtype and np.array_equal(converted[name], array), name
        assert folder_config(back, component) == folder_config(source, component)
    copied = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt")
    for name in copied:
        assert (back / name).read_bytes() == (source / name).read_bytes()
    # The single file holds LDM names only, all three components under their prefixes.
    names = list(open_tensor_file(single_files[fixture]))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(name.startswith(prefixes) for name in names)
    assert "model.diffusion_model.input_blocks.0.0.weight" in names
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in names


@pytest.mark.parametrize("fixture", TINY)
def test_config_inferred_from_shapes(single_files, fixture):
    source = ensure_fixture(fixture)
    model = load_single_file(single_files[fixture], config=TINY_TEXT_HEADS)
    for component in COMPONENTS:
        want, got = folder_config(source, component), getattr(model, component).config
        differing = {k for k in want.keys() | got.keys() if want.get(k) != got.get(k)}
        assert differing == NOT_INFERRED[component], component
    assert model.unet.config["in_channels"] == FIXTURES[fixture]["unet"]["in_channels"]
    assert model.unet.config["attention_head_dim"] == 8 and model.vae.config["sample_size"] == 512


def test_sd15_config_inferred_exactly_from_shapes(monkeypatch):
    # The full SD 1.5 layout without its 4 GB: zero-stride arrays of the right shapes stand in for the file.
    spec = FIXTURES["sd15-arch"]
    fake = {rule.ldm: np.broadcast_to(np.float32(0), rule.ldm_shape)
            for component in COMPONENTS for rule in key_map(component, spec[component]).values()}
    monkeypatch.setattr(checkpoint, "open_tensor_file", lambda path: fake)
    model = load_single_file("sd15.safetensors")
    for component in COMPONENTS:
        assert getattr(model, component).config == spec[component]


def test_loaded_tensors_are_memory_mapped_views(single_files):
    model = load_single_file(single_files["tiny-sd1"], config=TINY_TEXT_HEADS)
    q = model.vae.tensors["decoder.mid_block.attentions.0.to_q.weight"]
    assert q.ndim == 2 and memmapped(q)
    assert all(memmapped(a) for c in COMPONENTS for a in getattr(model, c).tensors.values())


@pytest.mark.parametrize("fixture", TINY)
def test_diffusers_from_single_file_reads_our_file(tmp_path, single_files, fixture):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    source = ensure_fixture(fixture)
    # Configs without weights: diffusers must take every tensor from our file, none from the folder.
    configs_only = tmp_path / "configs"
    shutil.copytree(source, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    pipe = StableDiffusionPipeline.from_single_file(str(single_files[fixture]), config=str(configs_only),
                                                    local_files_only=True, safety_checker=None)
    for component in COMPONENTS:
        theirs = {k: v for k, v in getattr(pipe, component).state_dict().items() if "position_ids" not in k}
        ours = open_component(source / component)
        if component == "text_encoder":  # transformers 5 names CLIPTextModel's tensors without "text_model."
            ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
        assert set(theirs) == set(ours), component
        for name, array in ours.items():
            assert np.array_equal(theirs[name].numpy(), array), name


@pytest.mark.parametrize("fixture, pipeline", [("tiny-sd1", "StableDiffusionPipeline"),
                                               ("tiny-sd1-inpaint", "StableDiffusionInpaintPipeline")])
def test_folder_from_bare_single_file_loads_in_diffusers(tmp_path, single_files, fixture, pipeline):
    pytest.importorskip("diffusers")
    from diffusers import DiffusionPipeline

    source = ensure_fixture(fixture)
    out = tmp_path / "converted"
    single_file_to_folder(single_files[fixture], out, config=TINY_TEXT_HEADS, tokenizer=source / "tokenizer")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == checkpoint.SD1_SCHEDULER
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe).__name__ == pipeline and type(pipe.scheduler).__name__ == "PNDMScheduler"
    for component in ("unet", "vae"):
        theirs = getattr(pipe, component).state_dict()
        assert all(np.array_equal(theirs[k].numpy(), v) for k, v in open_component(source / component).items())


def test_ckpt_with_training_extras_loads(tmp_path, single_files):
    torch = pytest.importorskip("torch")
    tensors = open_tensor_file(single_files["tiny-sd1"])
    state = {name: torch.from_numpy(np.array(array)) for name, array in tensors.items()}
    # What original SD .ckpt files also carry, none of it model weights.
    state.update({"betas": torch.zeros(1000), "alphas_cumprod": torch.zeros(1000),
                  "model_ema.decay": torch.tensor(0.9999),
                  "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)
    from_ckpt = load_single_file(path, config=TINY_TEXT_HEADS)
    from_safetensors = load_single_file(single_files["tiny-sd1"], config=TINY_TEXT_HEADS)
    for component in COMPONENTS:
        a, b = getattr(from_ckpt, component), getattr(from_safetensors, component)
        assert a.config == b.config
        assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in b.tensors)


def test_pickled_objects_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callback": Path("/tmp")}, path)
    with pytest.raises(ModelInputError, match="non-tensor Python objects, and is refused for safety"):
        open_tensor_file(path)


def test_truncated_and_corrupt_safetensors(tmp_path, single_files):
    data = single_files["tiny-sd1"].read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cases = {
        "cut.safetensors": (data[: len(data) // 2], "truncated file"),
        "header.safetensors": (data[: 8 + header_len // 2], "header but the file is"),
        "json.safetensors": (data[:8] + b"{" * header_len + data[8 + header_len:], "not valid JSON"),
        "tiny.safetensors": (data[:5], "too short"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ModelInputError, match=message) as error:
            open_tensor_file(path)
        assert str(path) in str(error.value)


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path, single_files):
    tensors = dict(open_tensor_file(single_files["tiny-sd1"]))
    dropped = [name for name in tensors if name.startswith("model.diffusion_model.output_blocks.")][:7]
    for name in dropped:
        del tensors[name]
    tensors["model.diffusion_model.extra_head.weight"] = np.zeros(3, np.float32)
    tensors["first_stage_model.decoder.mid.attn_1.k.weight"] = np.zeros((64, 63, 1, 1), np.float32)
    path = tmp_path / "broken.safetensors"
    write_safetensors(path, tensors)
    with pytest.raises(ModelInputError) as error:
        load_single_file(path, config=TINY_TEXT_HEADS)
    message = str(error.value)
    assert str(path) in message
    assert "7 missing" in message and dropped[0] in message and dropped[5] not in message and ", ..." in message
    assert "1 unexpected (model.diffusion_model.extra_head.weight)" in message
    assert ("1 mis-shaped (first_stage_model.decoder.mid.attn_1.k.weight [64, 63, 1, 1] "
            "(expected [64, 64, 1, 1] or [64, 64]))") in message


def test_wrong_user_config_is_reported_as_misshaped(single_files):
    with pytest.raises(ModelInputError, match="mis-shaped") as error:
        load_single_file(single_files["tiny-sd1"],
                         config={**TINY_TEXT_HEADS, "unet": {"norm_num_groups": 8, "cross_attention_dim": 48}})
    assert re.search(r"attn2\.to_k\.weight \[(\d+), 32\] \(expected \[\1, 48\]\)", str(error.value))


def test_conversion_input_errors(tmp_path, single_files):
    with pytest.raises(ModelInputError, match="width 32 is not a multiple"):
        load_single_file(single_files["tiny-sd1"])
    with pytest.raises(ModelInputError, match="no tokenizer"):
        single_file_to_folder(single_files["tiny-sd1"], tmp_path / "out", config=TINY_TEXT_HEADS)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ModelInputError, match="not empty"):
        single_file_to_folder(single_files["tiny-sd1"], tmp_path / "full", config=ensure_fixture("tiny-sd1"))
    with pytest.raises(ModelInputError, match="written as .safetensors or .ckpt"):
        folder_to_single_file(ensure_fixture("tiny-sd1"), tmp_path / "model.bin")
    unet_only = tmp_path / "unet_only.safetensors"
    tensors = open_tensor_file(single_files["tiny-sd1"])
    write_safetensors(unet_only, {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")})
    with pytest.raises(ModelInputError, match="no vae tensors"):
        load_single_file(unet_only)
    with pytest.raises(ModelInputError, match="no weight file in"):
        component_weight_files(tmp_path / "full")


def test_safetensors_dtypes_round_trip_with_the_reference_library(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    arrays = {
        "f64": rng.standard_normal((2, 3)), "f32": rng.standard_normal((4,)).astype(np.float32),
        "f16": rng.standard_normal((3, 1, 2)).astype(np.float16),
        "bf16": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "i32": np.arange(-3, 3, dtype=np.int32),
        "u8": np.arange(7, dtype=np.uint8), "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 4), np.float32),
        "big_endian": np.arange(3, dtype=">f4"),
    }
    ours_path = tmp_path / "ours.safetensors"
    write_safetensors(ours_path, arrays, metadata={"format": "pt"})
    theirs = safetensors_torch.load_file(ours_path)
    for name, array in arrays.items():
        tensor = theirs[name]
        got = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if name == "bf16" else tensor.numpy()
        assert got.shape == array.shape and np.array_equal(got, array), name
    theirs_path = tmp_path / "theirs.safetensors"
    safetensors_torch.save_file({k: v.clone() for k, v in theirs.items()}, theirs_path, metadata={"a": "b"})
    for path in (ours_path, theirs_path):
        loaded = open_tensor_file(path)
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype.newbyteorder("=") and np.array_equal(loaded[name], array), name
            assert loaded[name].size == 0 or memmapped(loaded[name]), name
    assert open_tensor_file(theirs_path).metadata == {"a": "b"}


def test_sharded_component_folder(tmp_path):
    a, b = {"x": np.ones(3, np.float32)}, {"y": np.zeros((2, 2), np.float16)}
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", a)
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", b)
    weight_map = {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    merged = open_component(tmp_path)
    assert set(merged) == {"x", "y"} and np.array_equal(merged["y"], b["y"])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelInputError, match="shards that are missing: model-00002-of-00002.safetensors"):
        open_component(tmp_path)
