"""`parity suite`: the CI parity suite on the embedded tiny model (what `make parity` runs)."""
from __future__ import annotations

from pathlib import Path

from sd_parity.cases.case import Case
from sd_parity.fixtures import IMAGES_DIR, STRESS_SUFFIX
from sd_parity.runs.config import RunConfig
from .run import add_executor_arguments, add_fault_argument, execute, executor_options, with_fault

INIT = str(IMAGES_DIR / "init_64.png")


def suite_cases(model: str = "tiny-sd1", steps: int = 6) -> list[Case]:
    """Both backends; fp32 with DDIM, PNDM and a stochastic sampler; fp16 and bf16; txt2img and img2img;
    fp16 on the stress variant (docs/stress.md), where a port's numerics are put to the test."""
    base = dict(model=model, steps=steps, prompt="a photograph of an astronaut riding a horse",
                negative_prompt="blurry", seed=0)
    configs = [RunConfig(**base, scheduler=s) for s in ("ddim", "pndm", "euler_ancestral")]
    configs += [RunConfig(**base, scheduler="ddim", dtype=d) for d in ("fp16", "bf16")]
    configs += [RunConfig(**base, scheduler="ddim", pipeline="img2img", init_image=INIT, strength=0.7)]
    stress = RunConfig(**{**base, "model": model + STRESS_SUFFIX}, scheduler="ddim", dtype="fp16")
    return ([Case(config, candidate) for config in configs for candidate in ("torch", "numpy")]
            + [Case(stress, candidate, label=f"stress-txt2img-ddim-{candidate}-fp16") for candidate in ("torch", "numpy")])


def register(subparsers) -> None:
    parser = subparsers.add_parser("suite", help="the CI parity suite on tiny-sd1 (make parity)")
    parser.add_argument("--output-dir", type=Path, default=Path("reports"))
    parser.add_argument("--config", type=Path, default=None, help="parity.toml with tolerance overrides")
    add_fault_argument(parser)
    add_executor_arguments(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    title = "parity suite (tiny-sd1)" + (f" with fault {args.inject_fault}" if args.inject_fault else "")
    return execute(with_fault(suite_cases(), args.inject_fault), args.output_dir, args.config, title=title,
                   options=executor_options(args))
