"""`parity suite`: the CI parity suite on the tiny models of each family (what `make parity` runs)."""
from __future__ import annotations

from pathlib import Path

from sd_parity.cases.case import Case
from sd_parity.candidates.faults import fault
from sd_parity.fixtures import IMAGES_DIR, STRESS_SUFFIX, fixture_family
from sd_parity.runs.config import RunConfig
from .run import add_executor_arguments, add_fault_argument, execute, executor_options, with_fault
from ._options import add_parser, examples

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


# SD 2.x and SDXL on their tiny fixtures, each with its own shipped sampler (DDIM v-prediction; Euler),
# at fp32 and one half precision (SDXL at fp16, where its VAE decodes at float32), on both backends.
FAMILY_CASES = {"tiny-sd2": ("ddim", "bf16"), "tiny-sdxl": ("euler", "fp16")}


def family_cases(steps: int = 4) -> list[Case]:
    base = dict(steps=steps, prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry", seed=0)
    return [Case(RunConfig(**base, model=model, scheduler=scheduler, dtype=dtype), candidate,
                 label=f"{model}-txt2img-{scheduler}-{candidate}-{dtype}")  # one report folder per case
            for model, (scheduler, half) in FAMILY_CASES.items() for dtype in ("fp32", half)
            for candidate in ("torch", "numpy")]


def fault_cases(cases: list[Case], fault_name: str | None) -> list[Case]:
    """The cases a fault can be injected into: those whose model is of a family the fault is a bug of."""
    if fault_name is None:
        return cases
    families = fault(fault_name).families
    return [case for case in cases if families is None or fixture_family(case.config.model).name in families]


def register(subparsers) -> None:
    parser = add_parser(subparsers, "suite", help="the CI parity suite on tiny-sd1, tiny-sd2 and tiny-sdxl "
                                                  "(what make parity runs)",
                        description="Check our own clean-room SD (impl/, numpy and torch) against the reference "
                                    "on the embedded tiny models: samplers, dtypes and pipelines on tiny-sd1, its "
                                    "stress variant at fp16, SD 2.x and SDXL at fp32 and one half precision; 22 "
                                    "cases. Exit 0 parity, 1 divergence.",
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
    fault_name = args.inject_fault
    title = "parity suite (tiny-sd1, tiny-sd2, tiny-sdxl)" + (f" with fault {fault_name}" if fault_name else "")
    cases = with_fault(fault_cases(suite_cases() + family_cases(), fault_name), fault_name)
    return execute(cases, args.output_dir, args.config, title=title, options=executor_options(args))
