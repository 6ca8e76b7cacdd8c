"""`parity txt2img | img2img | inpaint`: run impl/ on a model and save a PNG."""
from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from sd_parity.errors import BadInput
from sd_parity.outputs import check_output_file, write_atomic
from sd_parity.progress import step_progress
from sd_parity.candidates.registry import builtin_names
from ._options import add_parser, add_renamed, examples
from .capture import add_run_arguments, config_from_args

PIPELINE_HELP = {
    "txt2img": "generate an image from a prompt with impl/",
    "img2img": "re-imagine --init-image with impl/",
    "inpaint": "repaint the white part of --mask in --init-image with impl/",
}


EXAMPLES = {
    "txt2img": (("parity txt2img --model tiny-sd1 --prompt 'a red cube' --steps 20 --output out.png",
                 "our clean-room SD on the embedded tiny model (random weights: expect noise-like art)"),
                ("parity txt2img --model /models/sd15 --candidate torch --scheduler euler --output cube.png",
                 "a real SD 1.5 checkpoint on the torch backend")),
    "img2img": (("parity img2img --model tiny-sd1 --init-image out.png --strength 0.6 --output again.png",
                 "re-imagine an image of the model's size"),),
    "inpaint": (("parity inpaint --model tiny-sd1-inpaint --init-image out.png --mask mask.png --output filled.png",
                 "repaint the white part of mask.png"),),
}


def register(subparsers) -> None:
    for pipeline, help_text in PIPELINE_HELP.items():
        parser = add_parser(subparsers, pipeline, help=help_text, epilog=examples(*EXAMPLES[pipeline]))
        add_run_arguments(parser, pipeline=pipeline)
        parser.add_argument("--candidate", default="numpy", choices=builtin_names(),
                            help="which impl/ backend runs the pipeline")
        add_renamed(parser, "--backend", "--candidate")
        parser.add_argument("--output", required=True, type=Path, metavar="PNG",
                            help="the PNG to write (several images: NAME-0.png, NAME-1.png, ...)")
        parser.set_defaults(handler=run, pipeline=pipeline)


def run(args) -> int:
    from PIL import Image

    from sd_parity.candidates.impl import ImplCandidate, ProgressObserver, request_for
    from sd_parity.candidates.replay import SeededReplay
    from sd_parity.impl.images import to_uint8

    if args.output.suffix.lower() != ".png":
        raise BadInput(f"--output {args.output} must end in .png")
    if not args.output.parent.is_dir():
        raise BadInput(f"--output folder {args.output.parent} does not exist")
    check_output_file(args.output, "--output")  # before any work
    config = config_from_args(args)
    started = time.perf_counter()
    candidate = ImplCandidate(args.candidate)
    candidate.prepare(config, config.model_dir())
    sd = candidate.sd
    loaded = time.perf_counter()
    replay = SeededReplay(config, scale=sd.vae_scale)
    pixels = sd(request_for(config, replay.x_T, replay.noise),
                ProgressObserver(step_progress(sys.stderr.isatty(), config.steps, f"{args.pipeline} {args.candidate}")))
    finished = time.perf_counter()
    images = to_uint8(pixels)
    paths = [args.output] if len(images) == 1 else [
        args.output.with_name(f"{args.output.stem}-{i}.png") for i in range(len(images))]
    for path in paths:
        check_output_file(path, "--output")
    for path, image in zip(paths, images):
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        write_atomic(path, png.getvalue())
    print(f"wrote {', '.join(map(str, paths))}: {config.width}x{config.height}, {config.steps} steps of "
          f"{config.scheduler}, {args.candidate} {config.dtype}; load {loaded - started:.1f} s, "
          f"run {finished - loaded:.1f} s ({(finished - loaded) / config.steps:.2f} s/step)")
    return 0

