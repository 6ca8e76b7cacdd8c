"""`parity export RUN --output-dir DIR` and `parity import DIR --output RUN.h5`: a run between its two forms.

The directory form (.npy or .safetensors files plus run.json) is what ports in Rust, Swift or C++
write and read most easily; the HDF5 run file is one file to keep and share. Both carry the same
tensors, order, dtypes, layouts and metadata (docs/run-format.md).
"""
from __future__ import annotations

from pathlib import Path

from sd_parity.errors import BadInput
from sd_parity.runs.directory import TENSOR_FORMATS, DirectoryRunWriter
from sd_parity.runs.hdf5 import RunWriter
from sd_parity.runs.open import copy_run, open_run
from ._options import add_parser, add_renamed, examples


def register(subparsers) -> None:
    export = add_parser(
        subparsers, "export", help="write a run as a folder of .npy or .safetensors files plus run.json",
        description="Convert a run (HDF5 file or folder) to the directory form that any language can read: "
                    "<component>/<invocation>/<name>.npy (or .safetensors) and run.json. Exit 0 written, 2 bad input.",
        epilog=examples(("parity export ref.h5 --output-dir ref/", "every tensor as .npy, with run.json"),
                        ("parity export ref.h5 --output-dir ref/ --format safetensors", "one .safetensors per tensor")))
    export.add_argument("run", type=Path, metavar="RUN", help="the run to export (.h5 file or run folder)")
    export.add_argument("-o", "--output-dir", type=Path, required=True, metavar="DIR",
                        help="the run folder to write (replaced if it is a run folder already)")
    add_renamed(export, "--output", "--output-dir")
    export.add_argument("--format", choices=TENSOR_FORMATS, default="npy",
                        help="one .npy or one .safetensors file per tensor")
    export.set_defaults(handler=run_export)

    imported = add_parser(
        subparsers, "import", help="convert a run folder (.npy/.safetensors + run.json) into an HDF5 run file",
        description="Convert a run folder written by a port into one HDF5 run file, checking it on the way. "
                    "Exit 0 written, 2 bad input.",
        epilog=examples(("parity import my_port_run/ --output port.h5", "one file to keep, share or compare")))
    imported.add_argument("run", type=Path, metavar="DIR", help="the run folder")
    imported.add_argument("-o", "--output", type=Path, required=True, metavar="RUN.h5", help="the run file to write")
    imported.add_argument("--compress", choices=("gzip", "lzf"), default=None,
                          help="compress the tensors (default: none)")
    imported.set_defaults(handler=run_import)


def _copy(source: Path, make_writer) -> int:
    """Copy the run at `source` into `make_writer(its metadata)`; the number of tensors copied."""
    if not source.exists():
        raise BadInput(f"{source} does not exist")
    with open_run(source) as reader, make_writer(reader.metadata) as writer:
        return copy_run(reader, writer)


def run_export(args) -> int:
    if args.output_dir.resolve() == args.run.resolve():
        raise BadInput(f"--output-dir {args.output_dir} is the run being exported; choose another folder")
    count = _copy(args.run, lambda metadata: DirectoryRunWriter(args.output_dir, metadata, tensor_format=args.format))
    print(f"wrote {args.output_dir} ({count} tensors, {args.format})")
    return 0


def run_import(args) -> int:
    if args.output.is_dir():
        raise BadInput(f"--output {args.output} is a folder; give a file path such as {args.output / 'run.h5'}")
    count = _copy(args.run, lambda metadata: RunWriter(args.output, metadata, compression=args.compress))
    print(f"wrote {args.output} ({count} tensors)")
    return 0
