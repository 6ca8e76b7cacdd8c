"""`parity fixtures [NAME]`: generate embedded model fixtures (deterministic, offline)."""
from __future__ import annotations

from sd_parity.fixtures import ensure_fixture, fixture_names
from sd_parity.runs.config import native_size
from ._options import add_parser, examples


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "fixtures", help="generate the embedded models (random weights, exact architectures) into the user cache",
        description="Generate embedded model fixtures, deterministically and offline, into the user cache "
                    "(~/.cache/sd-parity, or SD_PARITY_CACHE_DIR; docs/configuration.md). Any command that names "
                    "a fixture generates it on first use; this does it ahead of time.",
        epilog=examples(("parity fixtures", "tiny-sd1 (a few MB)"),
                        ("parity fixtures sd15-arch", "the full SD 1.5 architecture with random weights (4 GB)")))
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"fixtures to generate (default: tiny-sd1); known: {', '.join(fixture_names())}")
    parser.set_defaults(handler=run)


def run(args) -> int:
    for name in args.names or ["tiny-sd1"]:
        folder = ensure_fixture(name)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{name}: {folder} ({size / 2**20:.1f} MiB, default size {native_size(name)}px)")
    return 0
