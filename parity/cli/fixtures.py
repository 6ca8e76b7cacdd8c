"""`parity fixtures [NAME]`: generate embedded model fixtures (deterministic, offline)."""
from __future__ import annotations

from sd_parity.fixtures import FIXTURES, ensure_fixture, fixture_names


def register(subparsers) -> None:
    parser = subparsers.add_parser("fixtures", help="generate embedded model fixtures (into the user cache; see docs/configuration.md)")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"fixtures to generate (default: tiny-sd1); known: {', '.join(fixture_names())}")
    parser.set_defaults(handler=run)


def run(args) -> int:
    for name in args.names or ["tiny-sd1"]:
        folder = ensure_fixture(name)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{name}: {folder} ({size / 2**20:.1f} MiB, default size {FIXTURES[name]['default_size']}px)")
    return 0
