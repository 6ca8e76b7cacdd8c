"""`parity suite`: the CI parity suite on the embedded tiny model (what `make parity` runs)."""
from __future__ import annotations

from pathlib import Path

from sd_parity.cases.case import Case
from sd_parity.fixtures import IMAGES_DIR
from sd_parity.runs.config import RunConfig
from .run import add_executor_arguments, add_fault_argument, execute, executor_options, with_fault
from ._options import add_parser, examples

INIT = str(IMAGES_DIR / "init_64.png")


def suite_cases(model: str = "tiny-sd1", steps: int = 6) -> list[Case]:
    """Both backends; fp32 with DDIM, PNDM and a stochastic sampler; fp16 and bf16; txt2img and img2img."""
    base = dict(model=model, steps=steps, prompt="a photograph of an astronaut riding a horse",
                negative_prompt="blurry", seed=0)
    configs = [RunConfig(**base, scheduler=s) for s in ("ddim", "pndm", "euler_ancestral")]
    configs += [RunConfig(**base, scheduler="ddim", dtype=d) for d in ("fp16", "bf16")]
    configs += [RunConfig(**base, scheduler="ddim", pipeline="img2img", init_image=INIT, strength=0.7)]
    return [Case(config, candidate) for config in configs for candidate in ("torch", "numpy")]


def register(subparsers) -> None:
    parser = add_parser(subparsers, "suite", help="the CI parity suite on tiny-sd1 (what make parity runs)",
                        description="Check our own clean-room SD (impl/, numpy and torch) against the reference "
                                    "on the embedded tiny model: samplers, dtypes and pipelines, 12 cases. Exit 0 "
                                    "parity, 1 divergence.",
                        epilog=examples(("parity suite", "writes reports/parity.html, parity.json and junit.xml"),
                                        ("parity suite --inject-fault attention_no_scale --output-dir reports/fault",
                                         "the suite with a known porting bug: every case should catch it")))
    parser.add_argument("--output-dir", type=Path, default=Path("reports"), metavar="DIR",
                        help="folder for the reports (one subfolder per case)")
    parser.add_argument("--config", type=Path, default=None, metavar="parity.toml",
                        help="tolerance overrides (default: ./parity.toml, else ./pyproject.toml's [tool.parity])")
    add_fault_argument(parser)
    add_executor_arguments(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    title = "parity suite (tiny-sd1)" + (f" with fault {args.inject_fault}" if args.inject_fault else "")
    return execute(with_fault(suite_cases(), args.inject_fault), args.output_dir, args.config, title=title,
                   options=executor_options(args))
