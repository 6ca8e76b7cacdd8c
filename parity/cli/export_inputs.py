"""`parity export-inputs REF --block unet.down_blocks.1 --output-dir DIR`: one block's captured inputs as a run folder.

What a port in another language needs to run one block on exactly the reference's inputs, per
invocation (text-encoder call, UNet step, VAE call): `<component>/<invocation>/<block>@<argument>.npy`
plus run.json, whose metadata names the block and lists the outputs the reference recorded for it
(names, shapes, dtypes), so the port knows what to produce and under which names.
"""
from __future__ import annotations

from pathlib import Path

from sd_parity.candidates.runner import block_inputs, blocks_with_inputs
from sd_parity.errors import BadInput
from sd_parity.runs.directory import DirectoryRunWriter
from sd_parity.runs.naming import module_path
from sd_parity.runs.open import copy_run, open_run
from sd_parity.runs.selection import MODULE_COMPONENTS
from ._options import add_parser, add_renamed, examples


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "export-inputs", help="write one block's captured inputs (every step/call) as a run folder of .npy files",
        description="Write the reference's captured inputs of one block, for every invocation, as a run folder "
                    "(<component>/<invocation>/<block>@<argument>.npy + run.json), so a port in any language can "
                    "run that block alone. Exit 0 written, 2 bad input.",
        epilog=examples(("parity export-inputs ref.h5 --block unet.down_blocks.1 --output-dir in/",
                         "down block 1's inputs at every step; run.json lists the outputs expected"),
                        ("parity export-inputs ref.h5 --block unet.mid_block --invocation step_000 --output-dir in/",
                         "one step only")))
    parser.add_argument("reference", type=Path, metavar="REF", help="the reference run (.h5 file or run folder)")
    parser.add_argument("--block", required=True, metavar="COMPONENT.BLOCK",
                        help="e.g. unet.down_blocks.1, unet.mid_block, text_encoder.encoder.layers.0, "
                             "vae_decoder.decoder.up_blocks.2; a bare component (unet) is its own inputs")
    parser.add_argument("--invocation", action="append", default=None, metavar="LABEL",
                        help="only this invocation (step_000, call_1, ...); repeat for several (default: all)")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, metavar="DIR", help="the run folder to write")
    add_renamed(parser, "--out", "--output-dir")
    parser.set_defaults(handler=run)


def split_block(text: str) -> tuple[str, str]:
    """COMPONENT.BLOCK -> (component, block path); a bare component is the component itself ("")."""
    component, _, block = text.partition(".")
    if component not in MODULE_COMPONENTS:
        raise BadInput(f"--block {text}: starts with {component!r}, not a component ({', '.join(MODULE_COMPONENTS)})")
    return component, block


def run(args) -> int:
    component, block = split_block(args.block)
    if not args.reference.exists():
        raise BadInput(f"{args.reference} does not exist")
    with open_run(args.reference) as ref:
        entries = [e for e in ref.entries() if e.component == component
                   and (args.invocation is None or e.invocation in args.invocation)]
        available = blocks_with_inputs(component, entries)
        if block not in available:
            shown = ", ".join(f"{component}.{b}" if b else component for b in available) or "none"
            raise BadInput(f"{args.reference} holds no captured inputs of {args.block}"
                           f"{' in ' + ', '.join(args.invocation) if args.invocation else ''}; blocks with inputs: "
                           f"{shown}. Capture the reference with --capture all or blocks.")
        inputs = block_inputs(entries, block)
        first = inputs[0].invocation
        outputs = [[e.name, list(e.shape), e.dtype] for e in entries
                   if e.invocation == first and "@" not in e.name and module_path(e.name) == block]
        metadata = {**ref.metadata, "exported_block": args.block,
                    "invocations": list(dict.fromkeys(e.invocation for e in inputs)),
                    "expected_outputs": outputs}
        with DirectoryRunWriter(args.output_dir, metadata) as writer:
            count = copy_run(ref, writer, keys={e.key for e in inputs})
    print(f"wrote {args.output_dir}: {count} input tensors of {args.block} over "
          f"{len(metadata['invocations'])} invocation(s); expected outputs listed in {args.output_dir / 'run.json'}")
    return 0
