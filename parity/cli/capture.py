"""`parity capture`: run one implementation and write its run file."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from sd_parity.errors import BadInput
from sd_parity.outputs import check_output_file
from sd_parity.runs.config import DTYPES, PIPELINES, SCHEDULERS, RunConfig, parse_scheduler_setting
from ._options import add_parser, add_renamed, examples


def add_run_arguments(parser, pipeline: str | None = None) -> None:
    """The arguments that describe a run, shared by every command that runs a pipeline.

    Commands named after one pipeline (txt2img, ...) pass it; the others get a --pipeline option."""
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="a fixture name (tiny-sd1, tiny-sd2, tiny-sdxl, sd15-arch, ...: generated locally) "
                             "or a diffusers model folder")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt; repeat for several prompts in one batch (default: 'a red cube')")
    parser.add_argument("--negative-prompt", action="append", default=None,
                        help="negative prompt: one for all prompts, or one per --prompt (default: none, the "
                             "empty prompt)")
    parser.add_argument("--images-per-prompt", type=int, default=1, metavar="N", help="images per prompt")
    parser.add_argument("--steps", type=int, default=4, metavar="N", help="denoising steps")
    parser.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, metavar="SAMPLER",
                        help=f"sampler: {', '.join(SCHEDULERS)} (pndm, SD 1.5's own, calls the UNet steps+1 times)")
    parser.add_argument("--scheduler-config", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the reference's scheduler from the model's scheduler_config.json, "
                             "e.g. timestep_spacing=trailing, steps_offset=0, set_alpha_to_one=true (VALUE is JSON, "
                             "else a string); repeatable; impl and ports get the same settings (default: none)")
    parser.add_argument("--karras", action="store_true", help="Karras sigmas (dpmpp_2m)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (> 0 draws recorded noise)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed initial noise x_T")
    parser.add_argument("--height", type=int, default=None, metavar="PIXELS",
                        help="image height, a multiple of 8 (default: the model's native size, its UNet's "
                             "sample_size x the VAE's scale, e.g. 512 for SD 1.5; the init image's for img2img)")
    parser.add_argument("--width", type=int, default=None, metavar="PIXELS",
                        help="image width, a multiple of 8 (default: as --height)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="precision of the run")
    parser.add_argument("--device", default="cpu", help="torch device of reference and torch runs (cpu, cuda:0, mps)")
    if pipeline is None:
        parser.add_argument("--pipeline", default="txt2img", choices=PIPELINES, help="which SD pipeline to run")
    if pipeline != "txt2img":
        parser.add_argument("--init-image", default=None, metavar="PNG",
                            help="img2img/inpaint: the RGB image to start from, of the run's size")
        parser.add_argument("--strength", type=float, default=0.75,
                            help="img2img/inpaint: the fraction of the schedule to run, in (0, 1]")
    if pipeline in (None, "inpaint"):
        parser.add_argument("--mask", default=None, metavar="PNG",
                            help="inpaint: mask image (white = repaint), the init image's size")


def config_from_args(args) -> RunConfig:
    return RunConfig(
        model=args.model, prompt=_one_or_list(args.prompt or ["a red cube"]),
        negative_prompt=_one_or_list(args.negative_prompt) if args.negative_prompt else None,
        images_per_prompt=args.images_per_prompt, steps=args.steps,
        scheduler=args.scheduler, guidance=args.guidance, seed=args.seed, height=args.height,
        width=args.width, dtype=args.dtype, capture=getattr(args, "capture", None), eta=args.eta,
        karras=args.karras, compression=getattr(args, "compress", None), device=args.device,
        pipeline=args.pipeline, init_image=getattr(args, "init_image", None), mask_image=getattr(args, "mask", None),
        strength=getattr(args, "strength", 0.75),
        scheduler_overrides=dict(parse_scheduler_setting(text) for text in getattr(args, "scheduler_config", [])))


def _one_or_list(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values


def register(subparsers) -> None:
    parser = add_parser(subparsers, "capture", help="run the reference (or a candidate) and write its run file",
                        epilog=examples(
                            ("parity capture --model tiny-sd1 --output ref.h5",
                             "the reference (diffusers) run: every intermediate tensor, for a port to match"),
                            ("parity capture --model tiny-sd1 --candidate numpy --noise-from ref.h5 --output cand.h5",
                             "a candidate's run from the reference's x_T and noise, then: parity compare ref.h5 cand.h5"),
                            ("parity capture --model /models/sd15 --capture 'unet;steps=0,-1' --output ref.h5",
                             "a real checkpoint, keeping only the UNet's tensors of the first and last step")))
    parser.add_argument("--candidate", default="reference", metavar="SPEC",
                        help="what to run: reference (diffusers), numpy or torch (impl/), an installed port's "
                             "name, pkg.module:factory or path/to/port.py:factory")
    add_renamed(parser, "--impl", "--candidate")
    add_run_arguments(parser)
    parser.add_argument("--capture", default=None, metavar="SPEC",
                        help="what to keep: all, blocks, pipeline, a component, glob:PATTERN (the glob of "
                             "docs/maps.md: *, **, ?; brackets are literal), re:REGEX, steps=LIST, joined by ';' "
                             "(default: all for small models, blocks for full-size ones)")
    parser.add_argument("--compress", choices=("gzip", "lzf"), default=None,
                        help="compress the run file's tensors (default: none)")
    parser.add_argument("--noise-from", type=Path, default=None, metavar="REF.h5",
                        help="candidate runs: replay this reference run's x_T and recorded noise (default: the "
                             "seeded x_T, the same one the reference uses)")
    oracle = parser.add_mutually_exclusive_group()
    oracle.add_argument("--oracle", action="store_true",
                        help="reference only: the fp64 oracle of this run (for compare --oracle), one network in "
                             "memory at a time")
    oracle.add_argument("--block-oracle", type=Path, default=None, metavar="REF.h5",
                        help="reference only: each block of the reference run REF.h5 re-run in fp64 on its captured "
                             "inputs (for compare --block-oracle), one block in memory at a time")
    parser.add_argument("--output", required=True, type=Path, metavar="RUN.h5", help="the run file to write")
    parser.set_defaults(handler=run)


def run(args) -> int:
    config = config_from_args(args)
    if args.output.is_dir():
        raise BadInput(f"--output {args.output} is a folder; give a file path such as {args.output / 'run.h5'}")
    check_output_file(args.output, "--output")  # before any work
    started = time.perf_counter()
    if (args.oracle or args.block_oracle) and args.candidate != "reference":
        raise BadInput("--oracle and --block-oracle are runs of the reference; drop --candidate")
    if args.block_oracle is not None:
        from sd_parity.reference.oracle import run_block_oracle

        path = run_block_oracle(config, args.block_oracle, args.output)
    elif args.candidate == "reference":
        from sd_parity.reference.runner import run_reference

        path = run_reference(config, args.output, progress=sys.stderr.isatty(), oracle=args.oracle)
    else:
        from sd_parity.candidates.registry import resolve
        from sd_parity.candidates.runner import run_free

        path = run_free(resolve(args.candidate), config, args.output, reference=args.noise_from,
                        progress=sys.stderr.isatty())
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")
    return 0
