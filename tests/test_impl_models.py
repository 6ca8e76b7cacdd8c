"""Parity of the clean-room networks (impl/) with the diffusers/transformers reference, tensor by tensor.

Every block (CLIP layer, UNet down/mid/up block, VAE block) is fed the reference's captured inputs
and every component runs end to end from the reference's captured component inputs; every tensor
the reference captured inside that unit must be tapped under the same name, with the same shape and
dtype, and lie within the floor of its backend/dtype (tests/unit_parity.py: torch bit-identical at every
dtype; NumPy within relative L2 1e-5 at fp32, 1e-12 at fp64, 1e-2 at fp16, 6e-2 at bf16).
SD 2.x and SDXL are in tests/test_impl_families.py.

Test ids name the unit, backend and dtype: `pytest -k unet_block_1_down`, `-k "clip and numpy"`.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest

from sd_parity.impl.errors import ModelInputError
from sd_parity.impl.models import load_models, load_unet
from sd_parity.impl.ops import get_ops
from sd_parity.impl.ops.numpy_ops import NumpyOps
from sd_parity.impl.weights import WeightStore
from sd_parity.fixtures import FIXTURES, ensure_fixture
from sd_parity.runs.recorder import to_numpy
from sd_parity.runs.hdf5 import RunReader
from unit_parity import (BACKENDS, DTYPES, Collect, block_paths, capture, check_floor, compare_unit, rel_l2,
                         unit_floor, unit_id, unit_inputs)

INVOCATION = {"text_encoder": "call_0", "unet": "step_000", "vae_decoder": "call_0"}
TINY = FIXTURES["tiny-sd1"]


UNITS = [(c, p) for c in ("text_encoder", "unet", "vae_decoder") for p in ["", *block_paths("tiny-sd1", c)]]
CASES = [pytest.param(c, p, b, d, id=f"{unit_id(c, p)}-{b}-{d}") for c, p in UNITS for b in BACKENDS for d in DTYPES]


@pytest.fixture(scope="session")
def reference_tensors(reference_run):
    """dtype -> component -> {name: array} of one reference run per dtype (a single DDIM step)."""
    cache: dict[str, dict[str, dict[str, np.ndarray]]] = {}

    def get(dtype: str) -> dict[str, dict[str, np.ndarray]]:
        if dtype not in cache:
            path = reference_run(steps=1, scheduler="ddim", dtype=dtype)
            # Read NCHW-contiguous: the only tensors of this txt2img run flagged channels_last are
            # the VAE decoder's batch-1 mid/up tensors whose batch stride makes torch's kernels treat
            # them as contiguous (torch._prims_common.suggest_memory_format), which is what the
            # reference's convolutions did; a canonical channels-last view would change the rounding.
            with RunReader(path) as reader:
                cache[dtype] = {
                    component: {e.name: reader.read(e) for e in reader.entries()
                                if e.component == component and e.invocation == invocation}
                    for component, invocation in INVOCATION.items()}
        return cache[dtype]

    return get


@lru_cache(maxsize=None)
def models(backend: str, dtype: str):
    return load_models(ensure_fixture("tiny-sd1"), get_ops(backend, dtype))


@pytest.mark.parametrize("component, path, backend, dtype", CASES)
def test_unit_matches_reference(reference_tensors, component, path, backend, dtype):
    reference = reference_tensors(dtype)[component]
    model = models(backend, dtype).component(component)
    taps = Collect()
    out = model.run_block(path, unit_inputs(reference, path), taps=taps)
    assert out is not None
    check_floor(compare_unit(reference, taps.values, path), unit_floor(backend, dtype, component, path))


def test_block_names_are_the_reference_blocks():
    m = models("numpy", "fp32")
    assert m.text_encoder.block_names() == block_paths("tiny-sd1", "text_encoder")
    assert m.unet.block_names() == block_paths("tiny-sd1", "unet")
    assert m.vae.decoder.block_names() == block_paths("tiny-sd1", "vae_decoder")
    n = len(TINY["vae"]["block_out_channels"])
    assert m.vae.encoder.block_names() == [f"encoder.down_blocks.{i}" for i in range(n)] + ["encoder.mid_block"]


def test_block_call_takes_nested_or_flattened_skips(reference_tensors):
    """run_block accepts the captured `res_hidden_states_tuple[i]` names; block(...) takes the tuple."""
    reference = reference_tensors("fp32")["unet"]
    unet = models("numpy", "fp32").unet
    flat = unit_inputs(reference, "up_blocks.1")
    assert "res_hidden_states_tuple[2]" in flat
    from_names = unet.run_block("up_blocks.1", flat)
    nested = {k: v for k, v in flat.items() if "[" not in k}
    nested["res_hidden_states_tuple"] = tuple(flat[f"res_hidden_states_tuple[{i}]"] for i in range(3))
    np.testing.assert_array_equal(from_names, unet.block("up_blocks.1")(**flat))
    np.testing.assert_array_equal(from_names, unet.block("up_blocks.1")(**nested))
    with unet.ops.inference():
        direct = unet.module("up_blocks.1")(**nested)
    np.testing.assert_array_equal(from_names, direct)
    with pytest.raises(ModelInputError, match="cannot take inputs"):
        unet.run_block("up_blocks.1", {**flat, "bogus": flat["temb"]})
    with pytest.raises(ModelInputError, match="no block"):
        unet.block("down_blocks.9")


def test_taps_do_not_change_results():
    unet = models("numpy", "fp32").unet
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    plain = unet(sample, 500, context)
    tapped = Collect()
    np.testing.assert_array_equal(plain, unet(sample, 500, context, taps=tapped))
    assert "0" in tapped.values and "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q" in tapped.values


# ---------------------------------------------------------------------------------------------
# References built directly with the reference library's hooks (components the pipeline capture
# does not cover: the VAE encoder, 9-channel and linear-projection UNets, CLIP skip)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vae_encoder_and_posterior_sample(backend, layout):
    """channels_last: the image as diffusers' image processor makes it (an NCHW view of NHWC pixels);
    torch's convolutions round differently on it, and the torch backend must keep that layout."""
    import torch
    from diffusers import AutoencoderKL

    folder = ensure_fixture("tiny-sd1")
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    image = pixels.transpose(0, 3, 1, 2)
    if layout == "nchw":
        image = np.ascontiguousarray(image)
    noise = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    result = {}

    def call(recorder):
        x = torch.from_numpy(image)
        recorder.module_inputs("vae_encoder", "", {"x": x})
        dist = vae.encode(x).latent_dist
        recorder.module_output("vae_encoder", "", {"mean": dist.mean, "logvar": dist.logvar})
        result["sample"] = (dist.mean + dist.std * torch.from_numpy(noise)).numpy()

    reference = capture("vae_encoder", vae, call, include=("encoder", "quant_conv"))
    encoder = models(backend, "fp32").vae.encoder
    floor = None if backend == "torch" else 1e-5
    # captured block inputs are stored NCHW-contiguous: blocks run alone only for the NCHW image
    paths = ["", *encoder.block_names()] if layout == "nchw" else []
    for path in paths:
        taps = Collect()
        encoder.run_block(path, unit_inputs(reference, path), taps=taps)
        rows = compare_unit(reference, taps.values, path)
        if floor is None:
            assert max(r[1] for r in rows) == 0.0, path
        else:
            assert max(r[2] for r in rows) <= floor, path
    mean, logvar = encoder(image)
    sample = to_numpy(encoder.sample(mean, logvar, noise))
    if floor is None:
        np.testing.assert_array_equal(to_numpy(mean), reference["mean"])
        np.testing.assert_array_equal(sample, result["sample"])
    else:
        assert rel_l2(reference["mean"], to_numpy(mean)) <= floor
        assert rel_l2(result["sample"], sample) <= floor


def _unet_reference(unet_module, sample, timestep, context):
    import torch

    def call(recorder):
        unet_module(torch.from_numpy(sample), torch.tensor(timestep), torch.from_numpy(context), return_dict=False)

    return capture("unet", unet_module, call)


def _check_unet_e2e(unet, reference, floor):
    taps = Collect()
    unet.run_block("", unit_inputs(reference, ""), taps=taps)
    check_floor(compare_unit(reference, taps.values, ""), floor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inpainting_unet_with_nine_input_channels(backend):
    from diffusers import UNet2DConditionModel

    folder = ensure_fixture("tiny-sd1-inpaint")
    rng = np.random.default_rng(5)
    sample = rng.standard_normal((2, 9, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    reference = _unet_reference(UNet2DConditionModel.from_pretrained(folder / "unet").eval(), sample, 321, context)
    unet = load_unet(folder, get_ops(backend, "fp32"))
    assert unet.in_channels == 9
    _check_unet_e2e(unet, reference, None if backend == "torch" else 1e-5)
    with pytest.raises(ModelInputError, match="9"):
        unet(sample[:, :4], 321, context)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_config_variants(tmp_path, backend):
    """use_linear_projection, per-block head counts, two transformer layers, odd latent sizes."""
    import torch
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in TINY["unet"].items() if not k.startswith("_")}
    config.update(use_linear_projection=True, attention_head_dim=[2, 4, 4, 4], transformer_layers_per_block=2)
    torch.manual_seed(0)
    module = UNet2DConditionModel.from_config(config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # break the zero inits (conv_out, proj_out)
    module.save_pretrained(tmp_path / "unet")
    # the reference reads the saved file as impl does: its weights then sit at the file's alignment, like
    # impl's memory-mapped ones (MKL sums in another order on differently aligned data; docs/precision.md)
    module = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    rng = np.random.default_rng(6)
    sample = rng.standard_normal((1, 4, 10, 6)).astype(np.float32)  # not a multiple of 4: upsample sizes
    context = rng.standard_normal((1, 77, 32)).astype(np.float32)
    reference = _unet_reference(module, sample, 17, context)
    unet = load_unet(tmp_path, get_ops(backend, "fp32"))
    _check_unet_e2e(unet, reference, None if backend == "torch" else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_skip_is_the_normed_earlier_layer(backend):
    import torch
    from transformers import CLIPTextModel

    folder = ensure_fixture("tiny-sd1")
    ids = np.array([[49406, 320, 736, 7196, 49407] + [49407] * 72], dtype=np.int64)
    reference = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    with torch.inference_mode():
        hidden = reference(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2]
        expected = reference.final_layer_norm(hidden).numpy()
    got = to_numpy(models(backend, "fp32").text_encoder.encode(ids, clip_skip=1))
    if backend == "torch":
        np.testing.assert_array_equal(got, expected)
    else:
        assert rel_l2(expected, got) <= 1e-5


# ---------------------------------------------------------------------------------------------
# NumPy kernels and weight handling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_numpy_attention_blocks_and_shift_do_not_change_results(causal):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 3, 50, 8)) for _ in range(3))
    exact = np.empty_like(q)
    for b in range(2):
        for h in range(3):
            s = q[b, h] @ k[b, h].T / math.sqrt(8)
            if causal:
                s = np.where(np.tri(50, dtype=bool), s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            exact[b, h] = (e / e.sum(-1, keepdims=True)) @ v[b, h]
    big = NumpyOps("fp64", threads=1)
    tiny = NumpyOps("fp64", attention_block_bytes=8 * 7 * 50, threads=2)  # 7-row blocks, two workers
    for ops in (big, tiny):
        np.testing.assert_allclose(ops.attention(q, k, v, causal=causal), exact, rtol=1e-12, atol=1e-13)
        # scores beyond exp's range take the max-subtraction path
        np.testing.assert_allclose(ops.attention(q * 40, k * 40, v, causal=causal),
                                   _softmax_attention(q * 40, k * 40, v, causal), rtol=1e-10, atol=1e-12)


def _softmax_attention(q, k, v, causal):
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tri(q.shape[2], dtype=bool), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


def test_numpy_conv_bands_match_one_gemm():
    import torch

    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 13, 11))
    w = rng.standard_normal((6, 5, 3, 3))
    b = rng.standard_normal(6)
    for stride, padding in ((1, 1), (2, 1), (2, 0), (1, 0)):
        expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                              stride, padding).numpy()
        for ops in (NumpyOps("fp64", threads=1), NumpyOps("fp64", chunk_bytes=5 * 9 * 11 * 8 * 2, threads=2)):
            np.testing.assert_allclose(ops.conv2d(x, w, b, stride, padding), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 3e-7), ("fp64", 5e-15)])
def test_numpy_gelu_uses_an_accurate_erf(dtype, tolerance):
    """NumPy has no erf: the backend's own must be as good as the dtype (|d| / max(1, |gelu|))."""
    ops = NumpyOps(dtype, threads=1)
    x = ops.asarray(np.linspace(-12, 12, 40001))
    # x Phi(x) with Phi from erfc: exact in both tails (1 + erf(x) cancels for negative x)
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    got = ops.gelu(x).astype(np.float64)
    assert np.max(np.abs(got - exact) / np.maximum(np.abs(exact), 1.0)) <= tolerance


def test_fp32_weights_are_the_memory_mapped_file():
    """fp32 files at fp32 are used in place (no copy); other dtypes are converted once."""
    import mmap

    from sd_parity.impl.tensor_files import open_component

    folder = ensure_fixture("tiny-sd1")
    stored = open_component(folder / "unet")["conv_in.weight"]
    unet = load_unet(folder, get_ops("numpy", "fp32"))
    weight = unet.conv_in.w
    assert np.shares_memory(weight, unet.scope.store.tensors["conv_in.weight"])
    base = weight
    while getattr(base, "base", None) is not None:
        base = base.base
    assert isinstance(base, mmap.mmap)
    torch_unet = load_unet(folder, get_ops("torch", "fp32"))
    mapped = torch_unet.scope.store.tensors["conv_in.weight"]
    assert torch_unet.conv_in.w.data_ptr() == mapped.__array_interface__["data"][0]
    half = load_unet(folder, get_ops("numpy", "fp16")).conv_in.w
    assert half.dtype == np.float16 and np.array_equal(half, stored.astype(np.float16))


def test_weight_store_reports_every_problem_at_once():
    store = WeightStore({"a.weight": np.zeros((2, 3)), "b.weight": np.zeros(4), "c.weight": np.zeros(1),
                         "d.weight": np.zeros(1)}, source="unet/")
    store.take("a.weight", (2, 3))
    store.take("b.weight", (5,))
    store.take("x.weight", (7,))
    with pytest.raises(ModelInputError) as err:
        store.finish()
    message = str(err.value)
    assert "1 missing: x.weight [7]" in message
    assert "1 mis-shaped: b.weight is [4], expected [5]" in message
    assert "2 unexpected: c.weight, d.weight" in message


def test_config_that_does_not_match_the_weights_is_one_clear_error(tmp_path):
    import json
    import shutil

    folder = ensure_fixture("tiny-sd1")
    shutil.copytree(folder / "unet", tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 32, 64, 96]
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelInputError, match=r"mis-shaped: .*expected"):
        load_unet(tmp_path, get_ops("numpy", "fp32"))
    config.update(block_out_channels=[32, 32, 64, 64], addition_embed_type="text_time")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelInputError, match="addition_embed_type"):
        load_unet(tmp_path, get_ops("numpy", "fp32"))
