"""`parity convert`: Stable Diffusion checkpoints between a diffusers folder and the original single file.

    parity convert FOLDER --to ldm [--format safetensors|ckpt] [--output model.ckpt]
    parity convert model.ckpt --to diffusers [--output-dir FOLDER] [--config FOLDER] [--tokenizer DIR]

The single file is the CompVis/LDM layout most ports load (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`); `.ckpt` is a PyTorch checkpoint with a
`state_dict` of tensors only. Tensor names come from impl/ldm_keys.py, the one key map
(docs/checkpoints.md). FOLDER may also be a fixture name (tiny-sd1, ...). Exit 0 written, 2 bad input.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from sd_parity.errors import BadInput
from ._options import add_parser, examples

FORMATS = {"safetensors": ".safetensors", "ckpt": ".ckpt"}


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "convert", help="convert a checkpoint: diffusers folder -> original single file (.safetensors/.ckpt) or back",
        description="Convert an SD checkpoint between a diffusers folder and the original CompVis/LDM single "
                    "file that most ports load. Exit 0 written, 2 bad input.",
        epilog=examples(
            ("parity convert tiny-sd1 --to ldm", "writes tiny-sd1.safetensors (LDM layout) in the current folder"),
            ("parity convert /models/sd15 --to ldm --format ckpt --output sd15.ckpt", "a PyTorch .ckpt"),
            ("parity convert model.safetensors --to diffusers --output-dir my-model",
             "a single file back into a diffusers folder (usable as --model my-model)")))
    parser.add_argument("source", metavar="SOURCE",
                        help="a diffusers model folder or fixture name (--to ldm), or a .safetensors/.ckpt single "
                             "file (--to diffusers)")
    parser.add_argument("--to", required=True, choices=("ldm", "diffusers"), help="the layout to write")
    parser.add_argument("--format", choices=tuple(FORMATS), default=None,
                        help="--to ldm: safetensors or ckpt (a PyTorch state_dict of tensors only); default: "
                             "--output's suffix, else safetensors")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="--to ldm: the single file to write (default: SOURCE's name + .safetensors/.ckpt in "
                             "the current folder)")
    parser.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                        help="--to diffusers: the new folder to write (default: SOURCE's name without suffix in "
                             "the current folder)")
    parser.add_argument("--config", default=None, metavar="FOLDER",
                        help="--to diffusers: a diffusers folder (or fixture name) whose configs, scheduler and "
                             "tokenizer to use (default: inferred from tensor shapes, SD 1.5's scheduler, the "
                             "shipped CLIP tokenizer)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                        help="--to diffusers: a tokenizer folder (vocab.json, merges.txt) to copy (default: as --config)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from sd_parity.impl.checkpoint import folder_to_single_file, single_file_to_folder
    from sd_parity.impl.errors import ModelInputError

    source = _source(args.source)
    if args.to == "ldm":
        if not source.is_dir():
            raise BadInput(f"{source} is not a folder; --to ldm converts a diffusers model folder (--to diffusers "
                           "converts a single file)")
        if args.output_dir is not None:
            raise BadInput("--output-dir applies to --to diffusers; --to ldm writes one file: use --output FILE")
        output = _ldm_output(args, source)
        folder_to_single_file(source, output)
        print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, LDM layout)")
        return 0
    if not source.is_file():
        raise BadInput(f"{source} is not a file; --to diffusers converts a .safetensors or .ckpt single file")
    if args.format is not None:
        raise BadInput("--format applies to --to ldm; a diffusers folder is written as safetensors")
    if args.output is not None:  # the spelling before --output-dir named folders
        print("parity: note: --to diffusers writes a folder: use --output-dir (-o/--output still works, but will go)",
              file=sys.stderr)
    output = args.output_dir or args.output or Path.cwd() / source.stem
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BadInput(f"--output-dir {output} exists and is not an empty folder; choose a new folder")
    config = _source(args.config) if args.config is not None else None
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = args.tokenizer
        if tokenizer is None and not (config and (config / "tokenizer" / "vocab.json").is_file()):
            from sd_parity.fixtures import write_tokenizer

            tokenizer = Path(scratch) / "tokenizer"  # SD 1.x's CLIP tokenizer, built from the shipped vocabulary
            write_tokenizer(tokenizer)
        try:
            single_file_to_folder(source, output, config=config, tokenizer=tokenizer)
        except ModelInputError as exc:
            hint = "" if config else (" (from the command line: --config FOLDER, a diffusers folder with the "
                                           "model's configs)")
            raise BadInput(f"{exc}{hint}") from exc
    print(f"wrote {output} (diffusers folder)")
    return 0


def _source(text: str) -> Path:
    path = Path(text)
    if path.exists():
        return path
    from sd_parity.fixtures import FIXTURES, ensure_fixture

    if text in FIXTURES:
        return ensure_fixture(text)
    raise BadInput(f"{text} does not exist (nor is it a fixture: {', '.join(sorted(FIXTURES))})")


def _ldm_output(args, source: Path) -> Path:
    if args.output is None:
        return Path.cwd() / f"{source.name}{FORMATS[args.format or 'safetensors']}"
    suffix = args.output.suffix
    if suffix not in FORMATS.values():
        raise BadInput(f"--output {args.output}: a single file ends in .safetensors or .ckpt")
    if args.format is not None and FORMATS[args.format] != suffix:
        raise BadInput(f"--output {args.output} contradicts --format {args.format}")
    if args.output.exists():
        raise BadInput(f"--output {args.output} exists; remove it or choose another name")
    return args.output
