"""The name-map language (aliases, splits, transforms, no_counterpart), the built-in ldm map's coverage
for any SD 1.x/2.x UNet configuration, and `compare --only/--require`.

Run files are synthesized with RunWriter; the built-in map's structure is checked against diffusers'
own models instantiated on the meta device.
"""
import json

import numpy as np
import pytest

from sd_parity.cli import main as cli_main
from sd_parity.fixtures import FIXTURES
from sd_parity.impl.ldm_keys import modules
from sd_parity.judging.compare import compare_runs
from sd_parity.judging.maps.ldm import ldm_table
from sd_parity.judging.name_map import NameMap, NameMapError
from sd_parity.judging.scope import Scope, ScopeError
from sd_parity.judging.transforms import Transform
from sd_parity.judging.verdict import make_verdict
from sd_parity.reports.summary import build_summary
from sd_parity.runs.hdf5 import RunWriter
from sd_parity.runs.naming import module_path

META = {"impl": "test", "prompt": "a red cube", "seed": 0, "steps": 1, "mode": "free", "guidance": 7.5}
RNG = np.random.default_rng(0)


def write_run(path, tensors, **meta):
    with RunWriter(path, {**META, **meta}) as writer:
        for (component, invocation, name), array in tensors.items():
            writer.write(component, invocation, name, array)
    return path


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def map_file(tmp_path, text):
    path = tmp_path / "names.toml"
    path.write_text(text)
    return path


def statuses(comparison):
    return {r.key: r.status for r in comparison.results}


# ---------------------------------------------------------------------------------------------------
# the language


def test_aliases_fill_only_what_no_tensor_maps_directly(tmp_path):
    block, residual, child = rand(2, 3), rand(2, 3), rand(2, 3)
    ref = write_run(tmp_path / "r.h5", {("unet", "step_000", "down.0"): block,
                                        ("unet", "step_000", "down.0[1][0]"): block,
                                        ("unet", "step_000", "down.1@hidden_states"): block,
                                        ("unet", "step_000", "up.0@res[0]"): residual,
                                        ("unet", "step_000", "inner"): child})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "blk0"): block + 1e-7,
                                         ("unet", "step_000", "blk0_copy"): block,
                                         ("unet", "step_000", "res"): residual,
                                         ("unet", "step_000", "inner_as_container"): child})
    names = map_file(tmp_path, r"""
[[rule]]
glob = 'unet/*/blk0'
to = 'unet/\1/down.0'
also = ['unet/\1/down.0[1][0]', 'unet/\1/down.1@hidden_states']

[[rule]]
glob = 'unet/*/blk0_copy'
to = 'unet/\1/down.0[1][0]'

[[rule]]
glob = 'unet/*/res'
also = 'unet/\1/up.0@res[0]'

[[rule]]
glob = 'unet/*/inner_as_container'
also = ['unet/\1/inner']
""")
    comparison = compare_runs(ref, cand, name_map=names)
    rows = {r.key: r for r in comparison.results}
    assert set(statuses(comparison).values()) == {"pass"} and len(rows) == 5
    assert rows["unet/step_000/down.0[1][0]"].cand_key == "unet/step_000/blk0_copy"  # direct beats alias
    assert rows["unet/step_000/down.1@hidden_states"].cand_key == "unet/step_000/blk0"
    assert any("alias" in note for note in rows["unet/step_000/down.1@hidden_states"].notes)
    assert comparison.coverage.redundant_names == [] and comparison.coverage.extra == []


def test_a_container_whose_values_others_provide_is_redundant_not_extra(tmp_path):
    x = rand(4)
    ref = write_run(tmp_path / "r.h5", {("unet", "step_000", "conv1"): x})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "in_layers.2"): x, ("unet", "step_000", "in_layers"): x})
    names = map_file(tmp_path, r"""
[[rule]]
glob = 'unet/*/in_layers.2'
to = 'unet/\1/conv1'
[[rule]]
glob = 'unet/*/in_layers'
also = ['unet/\1/conv1']
""")
    comparison = compare_runs(ref, cand, name_map=names)
    assert statuses(comparison) == {"unet/step_000/conv1": "pass"}
    assert comparison.coverage.redundant_names == ["unet/step_000/in_layers"]


def test_split_a_fused_qkv_projection(tmp_path):
    q, k, v = rand(2, 5, 4), rand(2, 5, 4), rand(2, 5, 4)
    ref = write_run(tmp_path / "r.h5", {("unet", "step_000", f"attn1.to_{n}"): a for n, a in zip("qkv", (q, k, v))})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "attn1.in_proj"): np.concatenate([q, k, v], -1)})
    names = map_file(tmp_path, r"""
[[split]]
glob = 'unet/*/**.in_proj'
into = ['unet/\1/\2.to_q', 'unet/\1/\2.to_k', 'unet/\1/\2.to_v']
""")
    comparison = compare_runs(ref, cand, name_map=names)
    assert set(statuses(comparison).values()) == {"pass"} and len(comparison.results) == 3
    assert "part 2 of 3 along axis -1" in " ".join(comparison.results[1].notes)
    # a split must divide the axis
    bad = map_file(tmp_path, "[[split]]\nglob = 'unet/*/*'\ninto = ['unet/\\1/a', 'unet/\\1/b']\naxis = 1\n")
    with pytest.raises(NameMapError, match="cannot cut .* into 2 equal parts along axis 1"):
        compare_runs(ref, cand, name_map=bad)


@pytest.mark.parametrize("layout, stored, expect", [
    ("nhwc", lambda a: a.transpose(0, 2, 3, 1), (2, 3, 4, 5)),
    ("tokens", lambda a: a.transpose(0, 2, 3, 1).reshape(2, 20, 3), (2, 3, 4, 5)),
    ("reshape", lambda a: a.reshape(2, 3, 20), (2, 3, 4, 5)),
])
def test_layout_transforms(tmp_path, layout, stored, expect):
    x = rand(*expect)
    ref = write_run(tmp_path / "r.h5", {("unet", "step_000", "h"): x})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "h"): stored(x)})
    assert statuses(compare_runs(ref, cand)) == {"unet/step_000/h": "shape_mismatch"}
    names = map_file(tmp_path, f"[[transform]]\nglob = 'unet/**'\nlayout = \"{layout}\"\n")
    comparison = compare_runs(ref, cand, name_map=names)
    assert statuses(comparison) == {"unet/step_000/h": "pass"}
    assert any(f'layout = "{layout}"' in n for n in comparison.results[0].notes)


def test_tokens_work_both_ways_and_a_spatial_reference_of_tokens():
    x = rand(2, 3, 4, 5)
    tokens = Transform(layout="tokens")
    as_tokens = tokens.apply(x, (2, 20, 3))
    assert as_tokens.shape == (2, 20, 3) and np.array_equal(tokens.apply(as_tokens, x.shape), x)


def test_cfg_batch_order_and_a_batch_one_time_embedding(tmp_path):
    uncond, cond = rand(1, 8), rand(1, 8)
    temb = rand(1, 16)
    ref = write_run(tmp_path / "r.h5", {("unet", "step_000", "h"): np.concatenate([uncond, cond]),
                                        ("unet", "step_000", "time_embedding"): np.concatenate([temb, temb]),
                                        ("unet", "step_000", "@timestep"): np.array([981.0], np.float32)})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "h"): np.concatenate([cond, uncond]),
                                         ("unet", "step_000", "time_embedding"): temb,
                                         ("unet", "step_000", "@timestep"): np.array([981.0], np.float32)})
    before = compare_runs(ref, cand)
    assert statuses(before) == {"unet/step_000/h": "fail", "unet/step_000/time_embedding": "shape_mismatch",
                                "unet/step_000/@timestep": "pass"}
    names = map_file(tmp_path, "[[transform]]\nglob = 'unet/**'\nbatch = [1, 0]\nbroadcast = true\n")
    assert set(statuses(compare_runs(ref, cand, name_map=names)).values()) == {"pass"}


@pytest.mark.parametrize("raw, message", [
    ({"transform": [{"glob": "unet/**", "layout": "nchw"}]}, "layout = 'nchw'"),
    ({"transform": [{"glob": "unet/**", "batch": [0, 0]}]}, "permutation"),
    ({"transform": [{"glob": "unet/**"}]}, "at least one of layout"),
    ({"split": [{"glob": "unet/*/x", "into": ["unet/\\1/a"]}]}, "at least two parts"),
    ({"split": [{"glob": "unet/*/x", "into": ["unet/\\1/a", "unet/\\3/b"]}]}, "group 3"),
    ({"no_counterpart": [{"glob": "unet/*/x"}]}, "give a reason"),
    ({"base": "sdxl"}, "built-in map"),
    ({"rule": [{"glob": "unet/*/x", "also": "unet/\\1/y", "drop": True}]}, "either to"),
])
def test_map_errors_name_the_problem(raw, message):
    with pytest.raises(NameMapError, match=message):
        NameMap.from_dict(raw)


def test_unmatched_drop_never_drops_pipeline_tensors(tmp_path):
    x = rand(3)
    ref = write_run(tmp_path / "r.h5", {("pipeline", "main", "image"): x, ("unet", "step_000", "a"): x})
    cand = write_run(tmp_path / "c.h5", {("pipeline", "main", "image"): x, ("unet", "step_000", "b"): x})
    names = map_file(tmp_path, 'unmatched = "drop"\n')
    comparison = compare_runs(ref, cand, name_map=names)
    assert statuses(comparison) == {"pipeline/main/image": "pass", "unet/step_000/a": "missing"}
    assert comparison.coverage.dropped_names == ["unet/step_000/b"]
    assert comparison.coverage.unmatched_names == ["unet/step_000/b"]


def test_no_counterpart_is_listed_not_missing(tmp_path):
    x = rand(3)
    ref = write_run(tmp_path / "r.h5", {("unet", "step_000", "time_proj"): x, ("unet", "step_000", "conv"): x})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "conv"): x})
    names = map_file(tmp_path, "[[no_counterpart]]\nglob = 'unet/*/time_proj'\nreason = 'a function in LDM'\n")
    comparison = compare_runs(ref, cand, name_map=names)
    summary = build_summary(comparison, make_verdict(comparison))
    assert summary["verdict"]["status"] == "parity"
    assert "judged on 1 of 2 reference tensors" in summary["verdict"]["text"]
    assert summary["coverage"]["scope"]["no_counterpart"] == [
        {"key": "unet/step_000/time_proj", "reason": f"a function in LDM ({names})"}]


def test_many_literal_rules_are_looked_up_not_scanned():
    rules = [{"glob": f"unet/*/n{i}", "to": f"unet/\\1/r{i}"} for i in range(3000)]
    rules.insert(5, {"regex": r"unet/([^/]+)/n(2999)", "to": r"unet/\1/early\2"})  # an earlier pattern still wins
    name_map = NameMap.from_dict({"rule": rules})
    assert name_map.map_key("unet/step_004/n1234")[0] == "unet/step_004/r1234"
    assert name_map.map_key("unet/step_004/n2999")[0] == "unet/step_004/early2999"


# ---------------------------------------------------------------------------------------------------
# --only and --require


def test_only_and_require_judge_what_was_provided(tmp_path):
    x = rand(3)
    ref = write_run(tmp_path / "r.h5", {("text_encoder", "call_0", "encoder.layers.0"): x,
                                        ("unet", "step_000", "down_blocks.0[0]"): x,
                                        ("unet", "step_000", "down_blocks.0.resnets.0.conv1"): x,
                                        ("pipeline", "step_000", "latents"): x})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "down_blocks.0[0]"): x,
                                         ("pipeline", "step_000", "latents"): x})
    assert make_verdict(compare_runs(ref, cand)).status == "incomplete"
    comparison = compare_runs(ref, cand, scope=Scope(("unet/**",), "blocks"))
    summary = build_summary(comparison, make_verdict(comparison))
    assert statuses(comparison) == {"unet/step_000/down_blocks.0[0]": "pass"}
    assert summary["verdict"]["status"] == "parity"
    assert summary["coverage"]["scope"]["outside_only"] == 2
    assert summary["coverage"]["scope"]["not_required"] == ["unet/step_000/down_blocks.0.resnets.0.conv1"]
    assert ("judged on 1 of 4 reference tensors: 2 outside --only unet/**, 1 not provided and not required "
            "(--require blocks)") in summary["verdict"]["text"]
    # a required tensor still has to be there; a provided one that is not required is still judged
    assert make_verdict(compare_runs(ref, cand, scope=Scope((), "blocks"))).status == "incomplete"
    wrong = write_run(tmp_path / "w.h5", {("unet", "step_000", "down_blocks.0[0]"): x,
                                          ("unet", "step_000", "down_blocks.0.resnets.0.conv1"): x + 1,
                                          ("pipeline", "step_000", "latents"): x})
    assert make_verdict(compare_runs(ref, wrong, scope=Scope(("unet/**",), "blocks"))).status == "divergence"
    with pytest.raises(ScopeError):
        Scope((), "everything")


def test_compare_cli_takes_only_require_and_several_maps(tmp_path, capsys):
    x = rand(3)
    ref = write_run(tmp_path / "r.h5", {("unet", "step_000", "a"): x, ("unet", "step_000", "b"): x})
    cand = write_run(tmp_path / "c.h5", {("unet", "step_000", "A"): x})
    first = tmp_path / "first.toml"
    first.write_text("[[rule]]\nglob = 'unet/*/A'\nto = 'unet/\\1/a'\n")
    out = tmp_path / "out"
    assert cli_main(["compare", str(ref), str(cand), "--map", str(first), "--output-dir", str(out)]) == 1
    assert cli_main(["compare", str(ref), str(cand), "--map", str(first), "--only", "a",
                     "--output-dir", str(out)]) == 0
    assert "judged on 1 of 2" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["config"]["name_map"]["sources"] == [str(first)]
    assert cli_main(["compare", str(ref), str(cand), "--map", "ldm", "--output-dir", str(out)]) == 2
    assert "--model-dir" in capsys.readouterr().err  # the run names no model folder to generate the map from


# ---------------------------------------------------------------------------------------------------
# the built-in ldm map fits any SD 1.x/2.x configuration


def _sd2_like():
    unet = dict(FIXTURES["sd15-arch"]["unet"], attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                use_linear_projection=True)
    return unet


def _three_levels():
    return dict(FIXTURES["tiny-sd1"]["unet"], block_out_channels=[32, 64, 64], layers_per_block=1,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])


UNET_CONFIGS = {"tiny-sd1": FIXTURES["tiny-sd1"]["unet"], "sd15": FIXTURES["sd15-arch"]["unet"],
                "sd2-like": _sd2_like(), "three-levels": _three_levels()}


def _diffusers_unet(config):
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_ldm_map_names_only_real_diffusers_tensors_and_covers_every_module(name):
    config = UNET_CONFIGS[name]
    model = _diffusers_unet(config)
    table = ldm_table({"unet": config, "vae": FIXTURES["tiny-sd1"]["vae"],
                       "text_encoder": FIXTURES["tiny-sd1"]["text_encoder"]})
    paths = {path for path, _ in model.named_modules()}
    targets = [n for (component, _), t in table.exact.items() if component == "unet" for n in (t.to, *t.also) if n]
    # every name the map produces is a module of the diffusers model, a block's input or output, or the
    # UNet's own input or output ("@sample", "0")
    assert all(module_path(n) in paths | {"", "0"} for n in targets)
    # every module diffusers calls has a counterpart, or the map says why not (inside a spatial transformer
    # the names agree, and the map renames the transformer's path as a whole)
    transformers = tuple(m.diffusers + "." for m in modules("unet", config) if m.kind == "transformer")
    assert all(table.prefixes["unet"][m.ldm] == m.diffusers for m in modules("unet", config) if m.kind == "transformer")
    leaves = {p for p, m in model.named_modules() if p and not list(m.children()) and not p.startswith(transformers)}
    covered = {module_path(n) for n in targets} | {module_path(n) for (c, n) in table.absent if c == "unet"}
    resnet_nonlinearity = {p for p in leaves if p.endswith(".nonlinearity")}  # covered as nonlinearity#k
    assert leaves - covered - resnet_nonlinearity == set()
    # residual aliases index real tuples: a down block yields its layers and its downsampler, an up block
    # takes as many as it has resnets
    for (component, _), target in table.exact.items():
        for alias in target.also:
            if "[1][" in alias:
                block = model.get_submodule(alias.split("[", 1)[0])
                produced = len(block.resnets) + (1 if block.downsamplers is not None else 0)
                assert int(alias.split("[1][")[1].rstrip("]")) < produced
            if "@res_hidden_states_tuple[" in alias:
                block = model.get_submodule(alias.split("@", 1)[0])
                assert int(alias.split("[")[1].rstrip("]")) < len(block.resnets)
    # the numbering is the walk's: the same LDM path the checkpoint key map uses for each module
    walk = {m.diffusers: m.ldm for m in modules("unet", config) if m.ldm}
    assert all(table.exact[("unet", ldm)].to.split("[")[0] == diffusers for diffusers, ldm in walk.items())


@pytest.mark.parametrize("candidate, reference", [
    ("unet/step_000/model.diffusion_model.input_blocks.4.0.out_layers.3", "unet/step_000/down_blocks.1.resnets.0.conv2"),
    ("unet/step_000/input_blocks.5.1.transformer_blocks.0.attn2.to_k", "unet/step_000/down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"),
    ("unet/step_001/output_blocks.8.2.conv", "unet/step_001/up_blocks.2.upsamplers.0.conv"),
    ("unet/step_001/middle_block.0.emb_layers.0", "unet/step_001/mid_block.resnets.0.nonlinearity#1"),
    ("unet/step_001/time_embed.1", "unet/step_001/time_embedding.act"),
    ("text_encoder/call_1/cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1", "text_encoder/call_1/encoder.layers.1.mlp.fc1"),
    ("text_encoder/call_0/text_model.final_layer_norm", "text_encoder/call_0/final_layer_norm"),
    ("vae_decoder/call_0/first_stage_model.decoder.up.1.block.0.nin_shortcut", "vae_decoder/call_0/decoder.up_blocks.2.resnets.0.conv_shortcut"),
    ("vae_decoder/call_0/decoder.up.3.upsample.conv", "vae_decoder/call_0/decoder.up_blocks.0.upsamplers.0.conv"),
    ("vae_encoder/call_0/encoder.down.1.downsample.conv", "vae_encoder/call_0/encoder.down_blocks.1.downsamplers.0.conv"),
])
def test_ldm_names_with_or_without_the_single_file_prefix(candidate, reference):
    """SD 1.5's layout: 2 layers per level, so input_blocks.4 is level 1's first layer, output_blocks.8 ends up level 2."""
    spec = FIXTURES["sd15-arch"]
    table = ldm_table({"unet": spec["unet"], "vae": spec["vae"], "text_encoder": spec["text_encoder"]})
    assert table.lookup(candidate).to == reference
