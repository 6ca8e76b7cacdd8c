"""Capture from Python: sd_parity.capture (torch hooks), tap/tap_inputs/wrap/invocation (any framework),
the atomic writer, the public replay, typed errors, and the missing-extra message."""
import gc
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sd_parity
from sd_parity.runs.hdf5 import RunFileError, RunReader, validate


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, emb=None):
        h = self.lin(x) + emb
        return h, (x, h * 2)


class Toy(nn.Module):
    """A port-style network: its own module names, a module called twice, an in-place op after a
    module's output, a dict output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.head = nn.Linear(4, 4), nn.Linear(4, 4)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.act = nn.SiLU()

    def forward(self, sample, scale):
        h = self.inp(sample)
        for block in self.blocks:
            h, _ = block(h, emb=scale)
        h = self.act(h)
        h.mul_(3)  # in place, after the hook saw act's output
        h = self.act(h)
        return {"sample": self.head(h)}


NAMES = {"inp": "conv_in", "blocks.0": "down_blocks.0", "blocks.1": "down_blocks.1", "act": "conv_act",
         "head": "conv_out"}
ARGUMENTS = {"x": "hidden_states", "emb": "temb", "@sample": "sample", "@scale": "timestep"}


def _tensors(path) -> dict[str, np.ndarray]:
    with RunReader(path) as reader:
        return {e.key: reader.read(e) for e in reader.entries()}


def test_capture_names_blocks_inputs_repeated_calls_and_structures(tmp_path):
    toy, x, scale = Toy(), torch.randn(2, 4), torch.randn(2, 4)
    plain = toy(x.clone(), scale)["sample"]
    with sd_parity.writer(tmp_path / "run.h5") as run, torch.no_grad():
        with sd_parity.capture(toy, "unet", names=NAMES, arguments=ARGUMENTS):
            captured = [toy(x, scale)["sample"] for _ in range(2)]
    assert all(torch.equal(plain, out) for out in captured), "a hook changed the module's output"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in toy.modules()), "hooks left behind"
    tensors = _tensors(run.path)
    step = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith("unet/step_000/")}
    assert set(step) == {"@sample", "@timestep", "conv_in", "down_blocks.0@hidden_states", "down_blocks.0@temb",
                         "down_blocks.0[0]", "down_blocks.0[1][0]", "down_blocks.0[1][1]",
                         "down_blocks.1@hidden_states", "down_blocks.1@temb", "down_blocks.1[0]", "down_blocks.1[1][0]",
                         "down_blocks.1[1][1]", "conv_act", "conv_act#1", "conv_out", "sample"}
    assert {k.split("/")[1] for k in tensors} == {"step_000", "step_001"}  # one invocation per call
    with torch.no_grad():
        h = toy.inp(x)
        for block in toy.blocks:
            h, _ = block(h, scale)
        first_act = toy.act(h)
    np.testing.assert_array_equal(step["conv_act"], first_act.numpy())  # before the in-place mul_
    np.testing.assert_array_equal(step["conv_act#1"], toy.act(first_act * 3).detach().numpy())
    np.testing.assert_array_equal(step["sample"], plain.detach().numpy())
    np.testing.assert_array_equal(step["@timestep"], scale.numpy())


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.post_quant_conv = nn.Linear(3, 3)

    def forward(self, z):
        return torch.relu(self.post_quant_conv(z))


def test_capture_default_names_and_a_bare_root_output(tmp_path):
    decoder, z = Decoder(), torch.ones(1, 3)
    with sd_parity.writer(tmp_path / "run.h5") as run, sd_parity.capture(decoder, "vae_decoder"), torch.no_grad():
        out = decoder(z)
    tensors = _tensors(run.path)
    assert sorted(tensors) == ["vae_decoder/call_0/0", "vae_decoder/call_0/@z", "vae_decoder/call_0/post_quant_conv"]
    np.testing.assert_array_equal(tensors["vae_decoder/call_0/0"], out.numpy())  # field 0, as the reference's VAE


def test_names_and_arguments_may_be_functions(tmp_path):
    toy, x, scale = Toy(), torch.randn(2, 4), torch.randn(2, 4)
    with sd_parity.writer(tmp_path / "map.h5") as by_map, sd_parity.capture(toy, "unet", NAMES, ARGUMENTS):
        toy(x, scale)
    with sd_parity.writer(tmp_path / "fn.h5") as by_function, sd_parity.capture(
            toy, "unet", names=lambda path: NAMES.get(path),
            arguments=lambda name, argument: ARGUMENTS.get(f"{name}@{argument}", ARGUMENTS.get(argument))):
        toy(x, scale)
    mapped, computed = _tensors(by_map.path), _tensors(by_function.path)
    assert sorted(mapped) == sorted(computed) and all(np.array_equal(mapped[k], computed[k]) for k in mapped)


def test_hooks_report_nothing_outside_a_run_and_refuse_bad_targets():
    toy = Toy()
    with sd_parity.capture(toy, "unet", names=NAMES):
        toy(torch.zeros(1, 4), torch.zeros(1, 4))  # no run open: the hooks stay silent
    with pytest.raises(sd_parity.BadInput, match="not a torch nn.Module"):
        sd_parity.capture(object(), "unet")
    with pytest.raises(sd_parity.BadInput, match="pipeline tensors are reported with sd_parity.tap"):
        sd_parity.capture(toy, "pipeline")


class ForeignArray:
    """An array of another framework (JAX, MLX): numpy.asarray converts it, nothing else knows it."""

    def __init__(self, values):
        self._values = np.asarray(values, dtype=np.float32)

    def __array__(self, dtype=None, copy=None):
        return self._values


def test_tap_wrap_and_invocations_for_a_non_torch_port(tmp_path):
    def unet(sample, timestep, params):
        sd_parity.tap("unet", "conv_in", ForeignArray(np.asarray(sample) + 1))
        sd_parity.tap_inputs("unet", "down_blocks.0", {"hidden_states": ForeignArray([[1.0, 2.0]])})
        return ForeignArray(np.asarray(sample) * 2)

    wrapped = sd_parity.wrap(unet, "unet", arguments={"sample": "sample", "timestep": "timestep"})
    assert np.array_equal(np.asarray(wrapped(ForeignArray([1.0]), 5, {"w": 1})), [2.0])  # outside a run: a call
    with sd_parity.writer(tmp_path / "run.h5") as run:
        for step in range(2):
            wrapped(ForeignArray([float(step)]), 999 - step, {"w": np.ones(3)})
            sd_parity.tap("pipeline", "latents", ForeignArray([step]), step=step)
        with sd_parity.invocation("text_encoder"):
            sd_parity.tap("text_encoder", "", {"last_hidden_state": np.zeros((1, 2))})
        sd_parity.tap("pipeline", "x_T", np.zeros(3))
    tensors = _tensors(run.path)
    assert sorted(tensors) == sorted([
        *(f"unet/step_00{i}/{name}" for i in (0, 1)
          for name in ("@sample", "@timestep", "conv_in", "down_blocks.0@hidden_states", "0")),
        "pipeline/step_000/latents", "pipeline/step_001/latents", "text_encoder/call_0/last_hidden_state",
        "pipeline/main/x_T"])
    assert tensors["unet/step_001/0"].tolist() == [2.0] and tensors["unet/step_001/@timestep"].tolist() == [998]
    assert tensors["unet/step_001/conv_in"].dtype == np.float32


def test_tap_says_what_is_wrong(tmp_path):
    sd_parity.tap("pipeline", "latents", np.zeros(2))  # outside a run: instrumented code runs as usual
    with sd_parity.writer(tmp_path / "run.h5") as run:
        with pytest.raises(sd_parity.BadInput, match="no unet invocation is open"):
            sd_parity.tap("unet", "conv_in", np.zeros(2))
        with pytest.raises(sd_parity.BadInput, match="tap_inputs"):
            with sd_parity.invocation("unet"):
                sd_parity.tap("unet", "down_blocks.0@hidden_states", np.zeros(2))
        with pytest.raises(sd_parity.BadInput, match="unknown component"):
            sd_parity.tap("vae", "decoder", np.zeros(2))
        with pytest.raises(sd_parity.BadInput, match="cannot store a object"):
            sd_parity.tap("pipeline", "latents", object())
        run.abort()


def test_writer_is_atomic_with_or_without_a_with_block(tmp_path):
    with pytest.raises(RuntimeError):
        with sd_parity.writer(tmp_path / "failed.h5") as run:
            run.tap("pipeline", "x_T", np.zeros(3))
            raise RuntimeError("the port crashed")
    forgotten = sd_parity.writer(tmp_path / "forgotten.h5")
    forgotten.tap("pipeline", "x_T", np.zeros(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del forgotten
        gc.collect()
    assert any("dropped without close()" in str(w.message) for w in caught)
    assert list(tmp_path.iterdir()) == [], "a failed or forgotten writer left a file behind"
    closed = sd_parity.writer(tmp_path / "closed.h5", name="my-port")
    closed.tap("pipeline", "x_T", np.zeros(3))
    assert closed.close() == tmp_path / "closed.h5" and validate(tmp_path / "closed.h5") == []
    assert [p.name for p in tmp_path.iterdir()] == ["closed.h5"]
    with RunReader(tmp_path / "closed.h5") as reader:
        assert reader.metadata["impl"] == "my-port" and reader.metadata["mode"] == "free"


def test_public_replay_hands_over_the_references_inputs(reference_run):
    ref = reference_run(steps=2, scheduler="euler_ancestral", capture="pipeline")
    with sd_parity.ReferenceReplay(ref) as replay, RunReader(ref) as reader:
        np.testing.assert_array_equal(replay.x_T, reader.read("pipeline/main/x_T"))
        np.testing.assert_array_equal(replay.token_ids(), reader.read("pipeline/main/token_ids"))
        assert replay.token_ids(negative=True).shape == (1, 77)
        np.testing.assert_array_equal(replay.noise("step", 1, (1, 4, 8, 8)), reader.read("pipeline/step_001/noise"))
        assert replay.metadata["scheduler"] == "euler_ancestral" and replay.metadata["steps"] == 2
        with pytest.raises(sd_parity.BadInput, match="shape"):
            replay.noise("step", 0, (2, 4, 8, 8))
        with pytest.raises(sd_parity.BadInput, match="recorded no"):
            replay.noise("posterior", 0, (1, 4, 8, 8))


def test_errors_are_typed():
    from sd_parity.fixtures import FixtureError
    from sd_parity.judging.name_map import NameMapError
    from sd_parity.judging.tolerances import ToleranceConfigError
    from sd_parity.runs.selection import CaptureSpecError

    for error in (sd_parity.BadInput, sd_parity.MissingExtra, sd_parity.NotAtParity, RunFileError, CaptureSpecError,
                  FixtureError, NameMapError, ToleranceConfigError):
        assert issubclass(error, sd_parity.SdParityError), error
    assert issubclass(sd_parity.NotAtParity, AssertionError) and issubclass(sd_parity.MissingExtra, sd_parity.BadInput)
    with pytest.raises(sd_parity.SdParityError):
        sd_parity.writer("/nonexistent-folder/run.h5")


MISSING_EXTRA = """
import sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # as if sd-parity were installed without its reference extra
from sd_parity.cli import main
code = main(sys.argv[1:])
assert not any(sys.modules.get(n) for n in ("torch", "diffusers")), "imported anyway"
sys.exit(code)
"""


@pytest.mark.parametrize("args", [
    ["run", "--model", "tiny-sd1", "--steps", "1", "--candidate", "numpy", "--output-dir", "{tmp}/out"],
    ["capture", "--candidate", "reference", "--model", "tiny-sd1", "--steps", "1", "--output", "{tmp}/r.h5"],
    ["txt2img", "--model", "tiny-sd1", "--steps", "1", "--backend", "torch", "--output", "{tmp}/x.png"],
    ["fixtures", "tiny-sd1"],
], ids=["run", "capture", "txt2img-torch", "fixtures"])
def test_missing_reference_extra_is_bad_input_not_a_traceback(tmp_path, args):
    env = {**os.environ, "SD_PARITY_MODELS_DIR": str(tmp_path / "models"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", MISSING_EXTRA, *[a.format(tmp=tmp_path) for a in args]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "install sd-parity[reference]" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "models" / "tiny-sd1").exists()


def test_the_core_runs_without_the_reference_extra(tmp_path, impl_run):
    reference, candidate = impl_run("torch", steps=1, capture="pipeline")
    for args in (["--help"], ["--version"], ["inspect", str(reference)],
                 ["compare", str(reference), str(candidate), "--output-dir", str(tmp_path / "cmp")]):
        done = subprocess.run([sys.executable, "-c", MISSING_EXTRA, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    assert (tmp_path / "cmp" / "report.html").is_file()
