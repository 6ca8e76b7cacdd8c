"""The reference runner: a real diffusers pipeline captured into a run file, offline and repeatably."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sd_parity.cli import main
from sd_parity.runs.hdf5 import RunReader, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = [sys.executable, "-m", "sd_parity"]

NO_NETWORK = '''
import socket
def _refuse(*args, **kwargs):
    raise OSError("network access attempted during an offline capture")
socket.socket.connect = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
'''


def _names(reader, component, invocation):
    return [e.name for e in reader.entries() if e.component == component and e.invocation == invocation]


def test_whole_capture_runs_with_the_network_cut(tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    env = {**os.environ, "PYTHONPATH": f"{guard}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    output = tmp_path / "ref.h5"
    result = subprocess.run(PARITY + ["capture", "--impl", "reference", "--model", "tiny-sd1", "--prompt", "a red cube",
                                      "--steps", "4", "--seed", "0", "--output", str(output)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    listing = subprocess.run(PARITY + ["inspect", str(output)], env=env, capture_output=True, text=True, cwd=REPO)
    assert listing.returncode == 0, listing.stderr
    for expected in ("text_encoder: 2 invocation(s)", "unet: 4 invocation(s)", "vae_decoder: 1 invocation(s)",
                     "step_003", "model_hash"):
        assert expected in listing.stdout, expected


def test_capture_records_modules_inputs_and_pipeline_tensors(reference_run):
    with RunReader(reference_run(steps=2, negative_prompt="blurry")) as reader:
        assert reader.invocations("unet") == ["step_000", "step_001"]
        unet = _names(reader, "unet", "step_000")
        for name in ("@sample", "@timestep", "@encoder_hidden_states", "conv_in", "time_embedding.act",
                     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", "down_blocks.0@temb",
                     "up_blocks.1@res_hidden_states_tuple[0]", "mid_block", "down_blocks.0[1][0]",
                     "down_blocks.0.resnets.0.nonlinearity", "down_blocks.0.resnets.0.nonlinearity#1", "conv_out"):
            assert name in unet, name
        # Module outputs come in execution order: a block's inputs, then its children, then the block.
        assert unet.index("down_blocks.0@hidden_states") < unet.index("down_blocks.0.resnets.0.conv1") \
            < unet.index("down_blocks.0[0]") < unet.index("mid_block@hidden_states")
        text = _names(reader, "text_encoder", "call_0")
        assert {"@input_ids", "encoder.layers.0.self_attn.q_proj", "final_layer_norm", "last_hidden_state"} <= set(text)
        decoder = _names(reader, "vae_decoder", "call_0")
        assert {"@z", "post_quant_conv", "decoder.mid_block", "decoder.up_blocks.0", "decoder.conv_out"} <= set(decoder)
        step = _names(reader, "pipeline", "step_001")
        assert step == ["latent_model_input", "timestep", "noise_pred_uncond", "noise_pred_text", "noise_pred",
                        "step_output", "latents"]
        main = _names(reader, "pipeline", "main")
        assert main == ["x_T", "token_ids", "negative_token_ids", "image", "image_uint8"]
        meta = reader.metadata
        assert meta["negative_prompt"] == "blurry" and meta["impl"] == "reference"
        assert {"model_hash", "x_T_sha256", "scheduler_config", "versions"} <= set(meta)

        # The captured pipeline tensors are the pipeline's own arithmetic, so they must satisfy it.
        uncond = reader.read("pipeline/step_001/noise_pred_uncond")
        text_pred = reader.read("pipeline/step_001/noise_pred_text")
        guided = reader.read("pipeline/step_001/noise_pred")
        np.testing.assert_allclose(guided, uncond + 7.5 * (text_pred - uncond), rtol=1e-5, atol=1e-5)
        unet_out = reader.read("unet/step_001/0")
        assert np.array_equal(np.concatenate([uncond, text_pred]), unet_out)
        image = reader.read("pipeline/main/image")
        assert np.array_equal(reader.read("pipeline/main/image_uint8"), (image * 255).round().astype(np.uint8))
        negative = reader.read("pipeline/main/negative_token_ids")
        assert negative[0, 0] == 49406 and negative[0, 1] != 49407  # "blurry", not the empty prompt
        assert np.array_equal(reader.read("pipeline/main/x_T"), reader.read("pipeline/step_000/latent_model_input")[:1])


@pytest.mark.parametrize("scheduler", ["ddpm", "euler_ancestral"])
def test_two_captures_of_one_seed_are_identical_byte_for_byte(tmp_path, scheduler):
    """Stochastic samplers draw from the run's seeded generator, and the run file holds nothing that
    changes between runs (no HDF5 timestamps, metadata keys in a fixed order): same seed, same bytes."""
    paths = [tmp_path / f"run{i}.h5" for i in range(2)]
    for path in paths:
        assert main(["capture", "--model", "tiny-sd1", "--steps", "2", "--scheduler", scheduler,
                     "--capture", "pipeline;unet;steps=-1", "--output", str(path)]) == 0
    with RunReader(paths[0]) as first, RunReader(paths[1]) as second:
        assert [e.key for e in first.entries()] == [e.key for e in second.entries()]
        for entry in first.entries():
            assert np.array_equal(first.read(entry), second.read(entry)), entry.key
        assert "pipeline/step_000/noise" in first
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_eta_draws_recorded_noise_that_changes_the_latents(reference_run):
    with RunReader(reference_run(steps=3, eta=0.0)) as still, RunReader(reference_run(steps=3, eta=1.0)) as noisy:
        assert "pipeline/step_001/noise" not in still
        assert noisy.metadata["eta"] == 1.0
        noise = noisy.read("pipeline/step_001/noise")
        assert noise.shape == noisy.entry("pipeline/step_001/latents").shape and 0.8 < noise.std() < 1.2
        moved = np.abs(still.read("pipeline/step_002/latents") - noisy.read("pipeline/step_002/latents")).max()
        assert moved > 0.1, moved


@pytest.mark.parametrize("scheduler, eta", [("ddim", 1.0), ("euler_ancestral", 0.0), ("ddpm", 0.0)])
def test_the_fp64_oracle_draws_the_same_noise_as_the_run(reference_run, scheduler, eta):
    fields = dict(steps=3, scheduler=scheduler, eta=eta, capture="pipeline")
    with RunReader(reference_run(**fields)) as run, RunReader(reference_run(dtype="fp64", **fields)) as oracle:
        for step in ("step_000", "step_001"):
            noise = run.read(f"pipeline/{step}/noise")
            assert noise.dtype == np.float32
            assert np.array_equal(noise.astype(np.float64), oracle.read(f"pipeline/{step}/noise")), step
        # same noise: the fp32 run stays within fp32 rounding of its oracle through the stochastic steps
        latents, exact = run.read("pipeline/step_002/latents"), oracle.read("pipeline/step_002/latents")
        assert np.linalg.norm(latents - exact) / np.linalg.norm(exact) < 1e-4


@pytest.mark.parametrize("scheduler, eta", [("ddim", 1.0), ("euler_ancestral", 0.0)])
def test_the_capture_does_not_change_what_diffusers_computes(reference_run, scheduler, eta):
    """Hooks and wrappers only watch: the captured image is bit for bit the one the plain diffusers
    pipeline makes from the same latents and a CPU generator seeded as its docs recommend."""
    import torch

    from sd_parity.reference.runner import load_pipeline, scheduler_for
    from sd_parity.runs.config import RunConfig

    config = RunConfig(model="tiny-sd1", steps=3, scheduler=scheduler, eta=eta, capture="pipeline")
    pipe = load_pipeline(config.model_dir(), "fp32")
    pipe.scheduler = scheduler_for(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        plain = pipe(prompt=config.prompt, num_inference_steps=3, guidance_scale=config.guidance, eta=eta,
                     latents=torch.from_numpy(config.initial_noise()), height=config.height, width=config.width,
                     generator=torch.Generator("cpu").manual_seed(config.seed), output_type="np").images
    with RunReader(reference_run(steps=3, scheduler=scheduler, eta=eta, capture="pipeline")) as run:
        assert np.array_equal(run.read("pipeline/main/image"), plain)


@pytest.mark.parametrize("dtype, stored", [("fp16", "float16"), ("bf16", "bfloat16"), ("fp64", "float64")])
def test_capture_at_each_dtype(reference_run, dtype, stored):
    with RunReader(reference_run(steps=1, dtype=dtype, capture="blocks")) as reader:
        entry = reader.entry("unet/step_000/mid_block")
        assert entry.dtype == stored
        assert np.isfinite(reader.read(entry).astype(np.float64)).all()
        assert reader.metadata["dtype"] == dtype


def test_capture_selection_by_component_glob_and_step(reference_run):
    with RunReader(reference_run(steps=3, capture="unet;glob:*attn2.to_?;steps=1")) as reader:
        assert reader.invocations("unet") == ["step_001"]
        assert reader.invocations("text_encoder") == [] and reader.invocations("vae_decoder") == []
        names = _names(reader, "unet", "step_001")
        assert names and all(n.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v")) for n in names)
        assert reader.invocations("pipeline") == ["main", "step_000", "step_001", "step_002"]


def test_killed_capture_leaves_nothing_that_looks_complete(tmp_path):
    output = tmp_path / "ref.h5"
    process = subprocess.Popen(PARITY + ["capture", "--model", "tiny-sd1", "--steps", "50", "--height", "128",
                                         "--width", "128", "--output", str(output)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".ref.h5.tmp") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers, "the capture had started writing"
    assert all(validate(p) for p in leftovers)


def _copy_model(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.mark.parametrize("args, message", [
    (["fixtures", "nope"], "unknown fixture 'nope'"),
    (["capture", "--model", "/no/such/folder", "--output", "{tmp}/r.h5"], "neither a fixture"),
    (["capture", "--model", "tiny-sd1", "--height", "100", "--output", "{tmp}/r.h5"], "multiple of 8"),
    (["capture", "--model", "tiny-sd1", "--capture", "glob:*;bogus", "--output", "{tmp}/r.h5"], "unknown capture term"),
    (["capture", "--model", "tiny-sd1", "--capture", "re:[", "--output", "{tmp}/r.h5"], "bad regular expression"),
    (["capture", "--model", "tiny-sd1", "--output", "{tmp}/missing/r.h5"], "does not exist"),
    (["capture", "--model", "tiny-sd1", "--output", "/proc/r.h5"], "cannot create"),
    (["capture", "--model", "tiny-sd1", "--output", "{tmp}"], "is a folder"),
    (["inspect", "{tmp}/none.h5"], "does not exist"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_component_and_truncated_weights_exit_2(tiny_model, tmp_path, capsys):
    folder = _copy_model(tiny_model, tmp_path)
    shutil.rmtree(folder / "vae")
    assert main(["capture", "--model", str(folder), "--output", str(tmp_path / "r.h5")]) == 2
    assert "lacks vae" in capsys.readouterr().err
    folder = _copy_model(tiny_model, tmp_path / "second")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    assert main(["capture", "--model", str(folder), "--output", str(tmp_path / "r.h5")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "r.h5").exists()


def test_img2img_capture_encodes_the_init_image_and_records_the_posterior_noise(reference_run):
    run = reference_run(pipeline="img2img", init_image="fixtures/images/init_64.png", strength=0.5, steps=4,
                        scheduler="ddpm")
    with RunReader(run) as reader:
        assert reader.invocations("vae_encoder") == ["call_0"]
        assert reader.invocations("unet") == ["step_000", "step_001"]  # int(4 * 0.5) steps remain
        assert {"@x", "encoder.down_blocks.0", "quant_conv", "mean", "logvar"} <= set(_names(reader, "vae_encoder", "call_0"))
        mean, logvar = reader.read("vae_encoder/call_0/mean"), reader.read("vae_encoder/call_0/logvar")
        noise = reader.read("pipeline/main/posterior_noise")
        sample = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * noise
        np.testing.assert_allclose(reader.read("pipeline/main/add_noise_original"), 0.18215 * sample, rtol=1e-5, atol=1e-6)
        # the noise added to the init latents is the fixed x_T, not a fresh draw
        assert "noise" in _names(reader, "pipeline", "step_001")  # DDPM's own per-step draw is recorded


def test_inpaint_capture_on_a_nine_channel_unet(reference_run):
    from sd_parity.runs.config import RunConfig
    from sd_parity.runs.cache import cached_run
    from sd_parity.reference.runner import run_reference

    config = RunConfig(model="tiny-sd1-inpaint", pipeline="inpaint", init_image="fixtures/images/init_64.png",
                       mask_image="fixtures/images/mask_64.png", strength=1.0, steps=2)
    with RunReader(cached_run(config, "reference", lambda c, p: run_reference(c, p, progress=False))) as reader:
        assert reader.entry("unet/step_000/@sample").shape == (2, 9, 8, 8)
        mask = reader.read("pipeline/main/mask")
        assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 1
        sample = reader.read("unet/step_000/@sample")
        assert np.array_equal(sample[:, 4:5], mask)


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "img2img"], "needs --init-image"),
    (["--pipeline", "img2img", "--init-image", "fixtures/images/init_64.png", "--strength", "0"], "outside (0, 1]"),
    (["--pipeline", "img2img", "--init-image", "fixtures/images/mask_64.png"], "not RGB"),
    (["--pipeline", "img2img", "--init-image", "fixtures/images/init_256.png", "--height", "64", "--width", "64"],
     "but the run is 64x64"),
    (["--pipeline", "inpaint", "--init-image", "fixtures/images/init_64.png", "--mask", "fixtures/images/mask_256.png"],
     "must be the same size"),
    (["--pipeline", "img2img", "--init-image", "README.md"], "not a readable image"),
])
def test_bad_pipeline_input_exits_2(tmp_path, capsys, args, message):
    assert main(["capture", "--model", "tiny-sd1", "--output", str(tmp_path / "r.h5"), *args]) == 2
    assert message in capsys.readouterr().err


def test_oracles_from_the_command_line(tmp_path):
    """`parity capture --oracle` is the run in fp64 (the time embedding too, which diffusers computes in
    float32 otherwise); `--block-oracle REF.h5` re-runs each block of REF.h5 in fp64 on its own inputs."""
    ref, oracle, blocks = (tmp_path / f"{name}.h5" for name in ("ref", "oracle", "blocks"))
    common = ["--model", "tiny-sd1", "--steps", "2"]
    assert main(["capture", *common, "--output", str(ref)]) == 0
    assert main(["capture", *common, "--oracle", "--output", str(oracle)]) == 0
    assert main(["capture", *common, "--block-oracle", str(ref), "--output", str(blocks)]) == 0
    with RunReader(ref) as r, RunReader(oracle) as o, RunReader(blocks) as b:
        assert o.metadata["dtype"] == "fp64" and o.entry("unet/step_000/time_proj").dtype == "float64"
        exact, fp32 = o.read("unet/step_000/time_proj"), r.read("unet/step_000/time_proj").astype(np.float64)
        assert 0 < np.linalg.norm(fp32 - exact) / np.linalg.norm(exact) < 1e-5
        assert b.metadata["mode"] == "block_oracle" and all("@" not in e.name for e in b.entries())
        inside = [e.key for e in r.entries() if e.component == "unet" and e.name.startswith("mid_block")
                  and "@" not in e.name]
        assert inside and all(key in b for key in inside)
        assert "unet/step_000/conv_in" not in b  # outside every block: the whole-run oracle's
        # the block oracle ran the block on the reference's inputs: it is far closer to the reference
        key = "unet/step_001/mid_block"
        near = np.linalg.norm(r.read(key) - b.read(key)) / np.linalg.norm(b.read(key))
        far = np.linalg.norm(r.read(key) - o.read(key)) / np.linalg.norm(o.read(key))
        assert near < far / 3, (near, far)
