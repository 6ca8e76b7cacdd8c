"""SD 2.x and SDXL networks (tiny-sd2, tiny-sdxl) against diffusers/transformers, unit by unit.

The reference is the family's own diffusers pipeline (StableDiffusionPipeline for SD 2.x,
StableDiffusionXLPipeline for SDXL) run for one guided step with the reference's capture hooks on every
component, so every unit sees the inputs a real run gives it (SDXL's UNet its added_cond_kwargs, its VAE
decoder float32 latents at fp16: force_upcast). Each component end to end and each of its blocks is then
fed those inputs and judged as SD 1.x's are (tests/unit_parity.py): torch bit-identical at every dtype,
NumPy within relative L2 1e-5 / 1e-12 / 1e-2 / 6e-2 at fp32 / fp64 / fp16 / bf16.

Ids name the fixture, unit, backend and dtype: `pytest -k "tiny-sdxl and text_encoder_2_block_1"`, `-k unet_block_mid`.
"""
from __future__ import annotations

from contextlib import ExitStack
from functools import lru_cache

import numpy as np
import pytest

from sd_parity.fixtures import ensure_fixture, fixture_family
from sd_parity.impl.errors import ModelInputError
from sd_parity.impl.families import FAMILIES, detect_family
from sd_parity.impl.models import load_models
from sd_parity.impl.ops import get_ops
from sd_parity.runs.naming import blocks_in
from sd_parity.runs.recorder import to_numpy
from unit_parity import (BACKENDS, DTYPES, Collect, block_paths, check_floor, compare_unit, rel_l2, unit_floor,
                         unit_id, unit_inputs)

FIXTURE_NAMES = ("tiny-sd2", "tiny-sdxl")
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"
FIRST = {"unet": "step_000"}  # the invocation each component's units are taken from (else call_0)


UNITS = [(f, c.name, p) for f in FIXTURE_NAMES for c in fixture_family(f).components if c.name != "vae_encoder"
         for p in ["", *block_paths(f, c.name)]]
CASES = [pytest.param(f, c, p, b, d, id=f"{f}-{unit_id(c, p)}-{b}-{d}") for f, c, p in UNITS
         for b in BACKENDS for d in DTYPES]


class _Writer:
    """A run-file writer keeping every tensor in memory: (component, invocation) -> {name: array}."""

    def __init__(self):
        self.values: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def write(self, component, invocation, name, array, **attributes):
        self.values.setdefault((component, invocation), {})[name] = array


def diffusers_pipeline(fixture: str, dtype: str = "fp32", kind: str = "txt2img"):
    """The family's diffusers pipeline of `kind` on the fixture (no safety checker, no watermark)."""
    import diffusers
    import torch

    family = fixture_family(fixture)
    options = {"add_watermarker": False} if family.name == "sdxl" else \
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    dtypes = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
    pipe = getattr(diffusers, family.pipelines[kind]).from_pretrained(
        str(ensure_fixture(fixture)), dtype=dtypes[dtype], local_files_only=True, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache(maxsize=None)
def reference(fixture: str, dtype: str) -> dict[str, dict[str, np.ndarray]]:
    """component -> {name: array} of its first invocation in one guided step of the diffusers pipeline."""
    import torch

    from sd_parity.candidates.hooks import hook_module
    from sd_parity.candidates.sinks import RecorderSink
    from sd_parity.runs.recorder import Recorder
    from sd_parity.runs.selection import CaptureSpec

    pipe = diffusers_pipeline(fixture, dtype)
    writer = _Writer()
    recorder = Recorder(writer, CaptureSpec.parse("all"), total_steps=1)
    decode = pipe.vae.decode

    def recorded_decode(z, *args, **kwargs):  # the reference runner's VAE decode capture
        with recorder.invocation("vae_decoder"):
            recorder.module_inputs("vae_decoder", "", {"z": z})
            result = decode(z, *args, **kwargs)
            recorder.module_output("vae_decoder", "", result)
        return result

    x_t = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
    with ExitStack() as stack, torch.inference_mode():
        for component in fixture_family(fixture).components:
            module = getattr(pipe, component.folder)
            stack.enter_context(hook_module(module, component.name, RecorderSink(recorder),
                                            include=component.subtrees, invocations=not component.subtrees))
        pipe.vae.decode = recorded_decode
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, latents=x_t.to(pipe.unet.dtype),
             output_type="np")
    return {component: values for (component, invocation), values in writer.values.items()
            if invocation == FIRST.get(component, "call_0")}


@lru_cache(maxsize=None)
def models(fixture: str, backend: str, dtype: str):
    return load_models(ensure_fixture(fixture), get_ops(backend, dtype))


@pytest.mark.parametrize("fixture, component, path, backend, dtype", CASES)
def test_unit_matches_reference(fixture, component, path, backend, dtype):
    captured = reference(fixture, dtype)[component]
    model = models(fixture, backend, dtype).component(component)
    taps = Collect()
    assert model.run_block(path, unit_inputs(captured, path), taps=taps) is not None
    check_floor(compare_unit(captured, taps.values, path), unit_floor(backend, dtype, component, path))


@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_block_names_are_the_reference_blocks(fixture):
    """impl's block lists, the registry's block patterns and the blocks the reference captured agree."""
    loaded = models(fixture, "numpy", "fp32")
    captured = reference(fixture, "fp32")
    for component in loaded.family.component_names:
        if component == "vae_encoder":
            continue
        names = loaded.component(component).block_names()
        assert names == block_paths(fixture, component)
        assert [b.path for b in blocks_in(component, captured[component])] == names


def test_families_are_detected_from_the_folders():
    assert detect_family(ensure_fixture("tiny-sd1")).name == "sd1"
    assert detect_family(ensure_fixture("tiny-sd2")).name == "sd2"
    assert detect_family(ensure_fixture("tiny-sdxl")).name == "sdxl"
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl"}


def test_unknown_folder_is_one_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelInputError, match="not a diffusers folder of a known family.*FluxPipeline"):
        detect_family(tmp_path)


def test_sdxl_vae_runs_at_float32_where_the_pipeline_upcasts():
    """force_upcast: SDXL's pipeline decodes at float32 under fp16 weights, and its img2img encodes at
    float32 under fp16 and bf16; SD 2.x's pipelines never upcast."""
    half = models("tiny-sdxl", "numpy", "fp16")
    assert (half.vae.decoder.ops.dtype, half.vae.encoder.ops.dtype, half.unet.ops.dtype) == ("fp32", "fp32", "fp16")
    bf16 = models("tiny-sdxl", "torch", "bf16")
    assert (bf16.vae.decoder.ops.dtype, bf16.vae.encoder.ops.dtype) == ("bf16", "fp32")
    sd2 = models("tiny-sd2", "numpy", "fp16")
    assert (sd2.vae.decoder.ops.dtype, sd2.vae.encoder.ops.dtype) == ("fp16", "fp16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_embedders_are_the_pipelines_encode_prompt(backend):
    """Context = both encoders' hidden_states[-2] (no final norm) concatenated; pooled = text_embeds of
    the second (its projection of the end-token state): diffusers' encode_prompt, on ids from both
    tokenizers (the second pads with "!")."""
    import torch

    from sd_parity.impl.tokenizer import Tokenizer

    pipe = diffusers_pipeline("tiny-sdxl")
    folder = ensure_fixture("tiny-sdxl")
    with torch.inference_mode():
        context, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    loaded = models("tiny-sdxl", backend, "fp32")
    contexts = []
    for embedder in loaded.family.conditioning.embedders:
        tokenizer = Tokenizer.from_folder(folder / embedder.tokenizer)
        ids = tokenizer([PROMPT])
        expected_ids = getattr(pipe, embedder.tokenizer)(PROMPT, padding="max_length", max_length=77,
                                                         truncation=True).input_ids
        assert ids[0].tolist() == expected_ids
        hidden, pool = loaded.text_encoders[embedder.component].embed(ids, embedder)
        contexts.append(to_numpy(hidden))
        if embedder.pooled:
            mine_pooled = to_numpy(pool)
    assert tokenizer.pad_id == 0 and ids[0, -1] == 0  # "!" padding on the second tokenizer
    mine = np.concatenate(contexts, -1)
    if backend == "torch":
        np.testing.assert_array_equal(mine, context.numpy())
        np.testing.assert_array_equal(mine_pooled, pooled.numpy())
    else:
        assert rel_l2(context.numpy(), mine) <= 1e-5 and rel_l2(pooled.numpy(), mine_pooled) <= 1e-5


def test_sd2_tokenizer_pads_with_the_exclamation_mark():
    from transformers import CLIPTokenizer

    from sd_parity.impl.tokenizer import Tokenizer

    folder = ensure_fixture("tiny-sd2") / "tokenizer"
    expected = CLIPTokenizer.from_pretrained(str(folder))(PROMPT, padding="max_length", max_length=77).input_ids
    ids = Tokenizer.from_folder(folder)([PROMPT])[0].tolist()
    assert ids == expected and ids[-1] == 0 and 49407 in ids


def test_text_time_unet_needs_its_added_conditions():
    unet = models("tiny-sdxl", "numpy", "fp32").unet
    sample = np.zeros((1, 4, 8, 8), np.float32)
    context = np.zeros((1, 77, 64), np.float32)
    with pytest.raises(ModelInputError, match="added_cond_kwargs"):
        unet(sample, 10, context)
    with pytest.raises(ModelInputError, match="add_embedding takes 80"):
        unet(sample, 10, context, {"text_embeds": np.zeros((1, 32), np.float32),
                                   "time_ids": np.zeros((1, 5), np.float32)})


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_attention_is_upcast(backend, dtype):
    """upcast_attention (SD 2.1's UNet sets it): at fp16/bf16 both backends' attention lands as close to
    the exact result as float32 attention rounded to the dtype (within 10%), and far closer than
    attention computed in the dtype itself (torch's matmul + softmax in half precision)."""
    import torch
    import torch.nn.functional as F

    assert models("tiny-sd2", "numpy", "fp32").unet.config.upcast_attention
    ops = get_ops(backend, dtype)
    rng = np.random.default_rng(0)
    q, k, v = (ops.asarray(rng.standard_normal((2, 4, 256, 16)).astype(np.float32) * 3) for _ in range(3))
    exact = to_numpy(F.scaled_dot_product_attention(*(torch.from_numpy(to_numpy(ops.cast(t, "fp64"))) for t in (q, k, v))))
    half = [torch.from_numpy(to_numpy(ops.cast(t, "fp32"))).to(torch.float16 if dtype == "fp16" else torch.bfloat16)
            for t in (q, k, v)]
    upcast = F.scaled_dot_product_attention(*(t.float() for t in half)).to(half[0].dtype).float().numpy()
    naive = ((half[0] @ half[1].transpose(-1, -2)) * 0.25).softmax(-1) @ half[2]
    mine = to_numpy(ops.cast(ops.attention(q, k, v), "fp32")).astype(np.float64)
    assert rel_l2(exact, mine) <= 1.1 * rel_l2(exact, upcast) < 0.3 * rel_l2(exact, naive.float().numpy())


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["sd21-arch", "sdxl-arch"])
def test_full_size_architectures_load_and_run(fixture):
    """The exact SD 2.1 and SDXL base architectures: every weight of every network is taken with the
    shape its config implies (load_models refuses a missing, unexpected or mis-shaped one), and the UNet
    runs one guided call; for sd21-arch it equals diffusers' UNet bit for bit (torch fp32, 8x8 latents;
    sdxl-arch's 10 GB UNet is not loaded twice on this machine: the benchmarks time it against diffusers)."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = ensure_fixture(fixture)
    loaded = load_models(folder, get_ops("torch", "fp32"))
    assert loaded.family.name == fixture_family(fixture).name
    config = loaded.unet.config
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, config.cross_attention_dim[0])).astype(np.float32)
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
                 "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]] * 2, np.float32)}
    mine = to_numpy(loaded.unet(sample, 500, context, added))
    assert np.isfinite(mine).all() and mine.std() > 0
    if fixture == "sd21-arch":
        del loaded
        reference = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
        with torch.inference_mode():
            expected = reference(torch.from_numpy(sample), torch.tensor(500), torch.from_numpy(context)).sample
        np.testing.assert_array_equal(mine, expected.numpy())
