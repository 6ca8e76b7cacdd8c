"""`parity txt2img | img2img | inpaint` and `parity capture --impl numpy|torch` on every pipeline."""
import numpy as np
import pytest
from PIL import Image

from sd_parity.cli import main
from sd_parity.runs.hdf5 import RunReader

INIT, MASK = "fixtures/images/init_64.png", "fixtures/images/mask_64.png"


@pytest.mark.parametrize("command, extra", [
    ("txt2img", ["--scheduler", "euler_ancestral"]),
    ("img2img", ["--init-image", INIT, "--strength", "0.6"]),
    ("inpaint", ["--init-image", INIT, "--mask", MASK, "--model", "tiny-sd1-inpaint"]),
])
def test_generate_writes_a_png(tmp_path, capsys, command, extra):
    output = tmp_path / "out.png"
    args = [command, "--model", "tiny-sd1", "--steps", "4", "--backend", "numpy", "--output", str(output), *extra]
    assert main(args) == 0
    image = np.asarray(Image.open(output))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert "s/step" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["txt2img", "--steps", "0"], "at least 1"),
    (["txt2img", "--steps", "1001"], "num_train_timesteps=1000"),
    (["txt2img", "--height", "60"], "multiple of 8"),
    (["img2img", "--init-image", INIT, "--strength", "1.5"], "outside (0, 1]"),
    (["img2img", "--init-image", MASK], "not RGB"),
    (["inpaint", "--init-image", INIT, "--mask", "fixtures/images/mask_256.png"], "same size"),
    (["inpaint", "--init-image", INIT], "needs --mask"),
    (["txt2img", "--output", "{tmp}/out.jpg"], "must end in .png"),
])
def test_bad_generation_input_exits_2(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.png")]
    assert main([*args, "--model", "tiny-sd1"]) == 2
    assert message in capsys.readouterr().err


def test_unknown_scheduler_exits_2(tmp_path):
    assert main(["txt2img", "--model", "tiny-sd1", "--scheduler", "heun", "--output", str(tmp_path / "o.png")]) == 2


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("pipeline, extra", [
    ("txt2img", []), ("img2img", ["--init-image", INIT]), ("inpaint", ["--init-image", INIT, "--mask", MASK]),
])
def test_impl_capture_of_each_pipeline(tmp_path, backend, pipeline, extra):
    output = tmp_path / "cand.h5"
    assert main(["capture", "--impl", backend, "--model", "tiny-sd1", "--steps", "2", "--pipeline", pipeline,
                 "--capture", "blocks", "--output", str(output), *extra]) == 0
    with RunReader(output) as reader:
        assert reader.metadata["impl"] == backend and reader.metadata["pipeline"] == pipeline
        assert "pipeline/main/image_uint8" in reader and reader.invocations("unet")
        assert bool(reader.invocations("vae_encoder")) == (pipeline != "txt2img")
