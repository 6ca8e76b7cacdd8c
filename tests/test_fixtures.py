"""Embedded fixtures: layout, determinism, tokenizer derivation, fixed inputs."""
import hashlib
import json

import numpy as np
import pytest

from sd_parity.fixtures import (FIXTURES, DATA_DIR, FixtureError, bpe_merges, ensure_fixture, fixed_noise,
                                fixture_family, generate, load_prompts, noise_path)

ASTRONAUT = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def test_tiny_fixture_has_the_published_sd_layout(tiny_model):
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for path in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (tiny_model / path).is_file(), path
    unet = json.loads((tiny_model / "unet/config.json").read_text())
    assert len(unet["block_out_channels"]) >= 2 and unet["layers_per_block"] == 2
    assert "CrossAttnDownBlock2D" in unet["down_block_types"] and "CrossAttnUpBlock2D" in unet["up_block_types"]
    assert json.loads((tiny_model / "text_encoder/config.json").read_text())["vocab_size"] == 49408


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd1-inpaint", "tiny-sd2", "tiny-sdxl"])
def test_generation_is_byte_identical_to_the_committed_hashes(tmp_path, name):
    committed = json.loads((DATA_DIR / "hashes.json").read_text())[name]
    assert _hashes(generate(name, tmp_path / name)) == committed
    assert _hashes(ensure_fixture(name)) == committed


def test_diffusers_loads_every_weight_of_the_fixture(tiny_model):
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, local_files_only=True)
    stored = load_file(str(tiny_model / "unet/diffusion_pytorch_model.safetensors"))
    loaded = pipe.unet.state_dict()
    assert set(stored) == set(loaded)
    assert all(np.array_equal(stored[k], loaded[k].numpy()) for k in stored)
    text = load_file(str(tiny_model / "text_encoder/model.safetensors"))
    assert all(k.startswith("text_model.") for k in text)
    loaded_text = pipe.text_encoder.state_dict()
    assert all(np.array_equal(text[k], loaded_text[k.removeprefix("text_model.")].numpy()) for k in text)


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl"])
def test_family_fixtures_have_their_family_layout_and_load_in_diffusers(name):
    """The registry's components, tokenizers, scheduler and model_index.json; every stored tensor is one
    the family's diffusers pipeline has, with the same values."""
    import diffusers
    from safetensors.numpy import load_file

    folder = ensure_fixture(name)
    family = fixture_family(name)
    index = json.loads((folder / "model_index.json").read_text())
    assert index == family.model_index() and index["_class_name"] == family.pipelines["txt2img"]
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler == family.scheduler
    options = {"add_watermarker": False} if family.name == "sdxl" else {"safety_checker": None}
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(str(folder), local_files_only=True, **options)
    for component in family.components:
        module = getattr(pipe, component.folder)
        assert type(module).__name__ == component.reference_class[1]
        stored = load_file(str(folder / component.folder / component.weights_file))
        loaded = module.state_dict()
        prefix = "text_model." if component.reference_class[1] == "CLIPTextModel" else ""
        assert {k.removeprefix(prefix) for k in stored} == set(loaded), component.name
        assert all(np.array_equal(v, loaded[k.removeprefix(prefix)].numpy()) for k, v in stored.items())
    for embedder in family.conditioning.embedders:
        tokenizer = getattr(pipe, embedder.tokenizer)
        assert tokenizer.pad_token == embedder.pad_token
        assert tokenizer("a horse", padding="max_length", max_length=77).input_ids[-1] == tokenizer.pad_token_id
    if family.name == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.unet.config.use_linear_projection
        assert pipe.text_encoder.config.hidden_act == "gelu" and pipe.tokenizer.pad_token_id == 0
    else:
        assert pipe.unet.config.addition_embed_type == "text_time" and pipe.vae.config.scaling_factor == 0.13025
        assert list(pipe.unet.config.transformer_layers_per_block) == [1, 2, 3]
        assert pipe.config.force_zeros_for_empty_prompt


def test_full_size_family_fixtures_are_the_published_architectures():
    """sd21-arch and sdxl-arch (generated on demand): the published configs' architecture fields."""
    sd21, sdxl = FIXTURES["sd21-arch"], FIXTURES["sdxl-arch"]
    assert sd21["unet"]["attention_head_dim"] == [5, 10, 20, 20] and sd21["unet"]["cross_attention_dim"] == 1024
    assert sd21["unet"]["sample_size"] * 8 == sd21["default_size"] == 768
    assert (sd21["text_encoder"]["num_hidden_layers"], sd21["text_encoder"]["hidden_size"]) == (23, 1024)
    assert sdxl["unet"]["transformer_layers_per_block"] == [1, 2, 10] and sdxl["unet"]["cross_attention_dim"] == 2048
    assert sdxl["unet"]["projection_class_embeddings_input_dim"] == 2816 and sdxl["default_size"] == 1024
    assert (sdxl["text_encoder_2"]["num_hidden_layers"], sdxl["text_encoder_2"]["hidden_size"]) == (32, 1280)
    assert fixture_family("sd21-arch").name == "sd2" and fixture_family("sdxl-arch").name == "sdxl"


def test_tokenizer_files_come_from_the_real_bpe_vocabulary(tiny_model):
    from transformers import CLIPTokenizer

    assert len(bpe_merges()) == 48894
    vocab = json.loads((tiny_model / "tokenizer/vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer"))
    ids = tokenizer("a photograph of an astronaut riding a horse", padding="max_length", max_length=77,
                    truncation=True).input_ids
    assert ids == ASTRONAUT + [49407] * (77 - len(ASTRONAUT))


def test_prompts_cover_the_edge_cases():
    prompts = {p["id"]: p["text"] for p in load_prompts()}
    assert prompts["empty"] == ""
    assert len(prompts["long"].split()) > 77
    assert any(ord(c) > 0x3000 for c in prompts["unicode"])
    assert "  " in prompts["spaces"]
    assert set("!,()[]") <= set(prompts["punctuation"])


def test_fixed_noise_is_a_file_that_is_never_redrawn(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_PARITY_CACHE_DIR", str(tmp_path))
    noise = fixed_noise("my-model", 64, 64, seed=3)
    path = noise_path("my-model", 64, 64, 3)
    assert path.parent == tmp_path / "noise", "x_T files of other models go to the user cache"
    assert path.exists() and noise.shape == (1, 4, 8, 8) and noise.dtype == np.float32
    np.save(path, np.full((1, 4, 8, 8), 7, np.float32))
    assert (fixed_noise("my-model", 64, 64, seed=3) == 7).all()
    assert fixed_noise("my-model", 64, 64, seed=3, batch=2).shape == (2, 4, 8, 8)
    np.save(noise_path("my-model", 64, 64, 4), np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(FixtureError, match="shape"):
        fixed_noise("my-model", 64, 64, seed=4)
    assert noise_path("tiny-sd1", 64, 64, 0).parent == DATA_DIR / "noise", "shipped x_T files are read in place"


def test_committed_noise_files_match_their_names():
    files = sorted((DATA_DIR / "noise").glob("*.npy"))
    assert files, "the standard x_T files are committed"
    for path in files:
        noise = np.load(path)
        assert noise.dtype == np.float32 and noise.ndim == 4


def test_unknown_fixture_is_refused():
    with pytest.raises(FixtureError, match="unknown fixture 'nope'"):
        ensure_fixture("nope")
    assert {"sd15-arch", "sd21-arch", "sdxl-arch"} <= set(FIXTURES)
