"""Tensor naming, block membership and capture selection."""
import numpy as np
import pytest

from sd_parity.runs.selection import CaptureSpec, CaptureSpecError
from sd_parity.runs.naming import Block, block_of, blocks_in, flatten, is_block_level, module_path


def test_flatten_names_nested_outputs():
    value = (np.zeros(1), (np.ones(1), np.ones(2)), {"sample": np.zeros(3)}, None)
    names = [name for name, _ in flatten("down_blocks.0", value, lambda v: isinstance(v, np.ndarray))]
    assert names == ["down_blocks.0[0]", "down_blocks.0[1][0]", "down_blocks.0[1][1]", "down_blocks.0[2][sample]"]
    assert [n for n, _ in flatten("", {"last_hidden_state": np.zeros(1)}, lambda v: isinstance(v, np.ndarray))] == ["last_hidden_state"]


@pytest.mark.parametrize("name, path", [
    ("down_blocks.1.resnets.0.nonlinearity#1", "down_blocks.1.resnets.0.nonlinearity"),
    ("up_blocks.2@res_hidden_states_tuple[0]", "up_blocks.2"),
    ("down_blocks.0[1][2]", "down_blocks.0"),
    ("@sample", ""),
])
def test_module_path_strips_suffixes(name, path):
    assert module_path(name) == path


@pytest.mark.parametrize("component, name, block_id", [
    ("unet", "down_blocks.3.resnets.1.conv1", "unet_block_3_down"),
    ("unet", "up_blocks.0@temb", "unet_block_0_up"),
    ("unet", "mid_block.attentions.0.proj_out", "unet_block_mid"),
    ("text_encoder", "encoder.layers.11.mlp.fc1", "clip_block_11"),
    ("vae_decoder", "decoder.up_blocks.1.upsamplers.0.conv", "vae_decoder_block_1_up"),
    ("vae_decoder", "decoder.mid_block.attentions.0.to_q", "vae_decoder_block_mid"),
], ids=lambda value: str(value).replace("_block_", "-"))  # keep `pytest -k unet_block_3` to block tests
def test_block_of(component, name, block_id):
    assert block_of(component, name).test_id == block_id


def test_tensors_outside_blocks_have_none():
    assert block_of("unet", "conv_in") is None and block_of("vae_decoder", "post_quant_conv") is None
    assert blocks_in("unet", ["conv_in", "down_blocks.0[0]", "down_blocks.0.resnets.0", "mid_block"]) == [
        Block("unet", "down_blocks.0"), Block("unet", "mid_block")]


@pytest.mark.parametrize("component, name, expected", [
    ("unet", "down_blocks.1[0]", True),
    ("unet", "down_blocks.1@temb", True),
    ("unet", "conv_in", True),
    ("unet", "0", True),
    ("unet", "down_blocks.1.resnets.0.conv1", False),
    ("vae_decoder", "decoder.up_blocks.0", True),
    ("vae_decoder", "decoder.conv_out", True),
    ("vae_decoder", "decoder.up_blocks.0.resnets.0", False),
    ("text_encoder", "encoder.layers.2", True),
    ("text_encoder", "encoder.layers.2.mlp", False),
])
def test_block_level_selection(component, name, expected):
    assert is_block_level(component, name) is expected


def test_capture_spec_terms():
    spec = CaptureSpec.parse("unet;glob:*attn2*;steps=0,2-3,-1")
    assert spec.wants("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q")
    assert not spec.wants("unet", "conv_in")
    assert not spec.wants("text_encoder", "x.attn2.y")
    assert spec.wants("pipeline", "latents")
    assert [s for s in range(10) if spec.wants_step(s, 10)] == [0, 2, 3, 9]
    assert CaptureSpec.parse("re:^conv_").wants("vae_decoder", "conv_out")
    assert not CaptureSpec.parse("pipeline").wants("unet", "conv_in")
    assert CaptureSpec.parse("blocks").wants("unet", "mid_block")
    assert not CaptureSpec.parse("blocks").wants("unet", "mid_block.resnets.0")


@pytest.mark.parametrize("text, message", [
    ("everything", "unknown capture term"),
    ("re:(", "bad regular expression"),
    ("steps=a", "bad step list"),
    ("steps=4-2", "bad step list"),
    ("glob:", "unknown capture term"),
])
def test_capture_spec_errors(text, message):
    with pytest.raises(CaptureSpecError, match=message):
        CaptureSpec.parse(text)


def test_one_glob_dialect_for_capture_maps_tolerances_and_only():
    """`[ ]` are literal (flattened outputs), `*` stops at '/', `**` does not: the same everywhere."""
    from sd_parity.judging.name_map import NameMap
    from sd_parity.judging.scope import Scope
    from sd_parity.judging.tolerances import Tolerances

    spec = CaptureSpec.parse("glob:down_blocks.0[1]*")
    assert spec.wants("unet", "down_blocks.0[1][2]") and not spec.wants("unet", "down_blocks.01")
    assert CaptureSpec.parse("glob:*.attn?").wants("unet", "mid_block.attn1")
    name_map = NameMap.from_dict({"rule": [{"glob": "unet/*/down_blocks.0[1]*", "to": "unet/\\1/x\\2"}]})
    assert name_map.map_key("unet/step_000/down_blocks.0[1][2]")[0] == "unet/step_000/x[2]"
    assert name_map.map_key("unet/step_000/down_blocks.01")[0] == "unet/step_000/down_blocks.01"  # kept, unmatched
    overrides = Tolerances.from_table({"overrides": [{"pattern": "down_blocks.0[1]*", "rtol": 1, "reason": "r"}]})
    assert overrides.rule_for("unet", "step_000", "down_blocks.0[1][2]", "float32").rtol == 1
    assert overrides.rule_for("unet", "step_000", "down_blocks.01", "float32").rtol != 1
    only = Scope(("unet/**", "down_blocks.0[1]*"))
    assert only.selects("unet/step_000/a/b") and only.selects("vae_decoder/call_0/down_blocks.0[1][0]")
    assert not Scope(("unet/*",)).selects("unet/step_000/x")  # `*` does not cross '/'
