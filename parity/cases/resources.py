"""What a case needs from the machine that runs it (memory, CPU threads, a GPU), what this machine has,
and how many cases fit on it at once.

Memory, estimated before a case starts (docs/scaling.md): a case produces its runs one after another
in one process (the reference in the case's dtype, the fp64 oracle when calibrated, the candidate, which
impl/ computes in fp32 at least), each loading every weight of the model in its dtype, then compares
tensor by tensor. The widest run sets the peak:

    peak ~= parameters x bytes per parameter of the widest run x (1 + 0.7 x images x pixels / default pixels)
            + 1 GiB

0.7 is the activations (UNet, VAE decoder, the capture writer's queue) per byte of weights for one image
at the model's default size: measured on sd15-arch, fp32, 512x512, a whole case (reference, torch free
and isolated, compare): peak RSS 7.56 GB = 4.27 GB of weights + 0.45 GB of imports + 2.84 GB. They grow
with the image's pixels and the batch. 1 GiB is the interpreter with torch, diffusers and transformers.
Threads: every case computes with an explicit thread count, given to its worker through the
environment before torch or BLAS load, so cases running side by side never oversubscribe the CPUs.
The count decides torch's reduction order (oneDNN picks kernels by it), so the same count gives the
same numbers whichever executor runs the case.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sd_parity.paths import MODELS_ENV, RUNS_ENV
from sd_parity.threads import env_threads, usable_cpus

from .case import Case

BYTES_PER_PARAMETER = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
ACTIVATIONS_PER_WEIGHT = 0.7  # one image at the model's default size (module docstring)
PROCESS_BYTES = 1 << 30
GIB = float(1 << 30)


# ---------------------------------------------------------------------------------------------------
# memory


@lru_cache(maxsize=None)
def parameter_count(model_dir: Path) -> int:
    """Parameters over the model's weight-bearing components (unet, vae, text encoders).

    safetensors headers give the exact count without reading weights; a pickled .bin is counted as
    fp16 from its size (at most twice its true count if it holds fp32)."""
    from sd_parity.impl.tensor_files import COMPONENT_WEIGHT_FILES, component_weight_files, open_tensor_file

    total = 0
    for component in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        if not any((component / name).is_file() for name in COMPONENT_WEIGHT_FILES):
            continue
        for path in component_weight_files(component):
            if path.suffix == ".safetensors":
                total += sum(int(array.size) for array in open_tensor_file(path).values())
            else:
                total += path.stat().st_size // 2
    return total


def case_memory(case: Case) -> int:
    """Estimated peak bytes of one case (module docstring)."""
    config = case.config
    model_dir = config.model_dir().resolve()
    widest = max(BYTES_PER_PARAMETER[config.dtype], BYTES_PER_PARAMETER["fp32"],
                 BYTES_PER_PARAMETER["fp64"] if case.calibrated else 0)
    images = len(config.prompts()) * config.images_per_prompt
    scale = images * config.height * config.width / default_pixels(model_dir)
    return int(parameter_count(model_dir) * widest * (1 + ACTIVATIONS_PER_WEIGHT * scale)) + PROCESS_BYTES


@lru_cache(maxsize=None)
def default_pixels(model_dir: Path) -> int:
    """Pixels of the image size the model was made for (its UNet's sample_size, in latents of 8 pixels)."""
    side = json.loads((model_dir / "unet" / "config.json").read_text()).get("sample_size", 64) * 8
    return side * side


def available_memory() -> int:
    """Bytes that new processes can use now without swapping (MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------------
# plans


@dataclass(frozen=True)
class Plan:
    jobs: int  # cases running at once
    threads: int  # threads each case computes with
    note: str = ""  # why fewer cases run at once than were asked for


def local_plan(cases: list[Case], jobs: int | None = None, threads: int | None = None) -> Plan:
    """How many of `cases` run at once on this machine, and with how many threads each.

    As many as asked (default: one per usable CPU, or one when the cases run on an accelerator), never
    more than the cases, nor than fit in the memory available now; threads: as given, else the CPUs
    split among the cases running at once, never above an OMP_NUM_THREADS the user set."""
    cpus = usable_cpus()
    on_cpu = all(case.config.device == "cpu" for case in cases)
    need, available = max(case_memory(case) for case in cases), available_memory()
    wanted = min(jobs or (cpus if on_cpu else 1), len(cases))
    count = max(1, min(wanted, available // need))
    note = ""
    if count < wanted:
        note = (f"{count} case{'s' if count > 1 else ''} at once, not {wanted}: each needs about {need / GIB:.1f} GiB "
                f"and {available / GIB:.1f} GiB are available now (docs/scaling.md)")
    return Plan(count, threads or max(1, min(cpus // count, env_threads() or cpus)), note)


def shared_environment(shared_dir: Path | None) -> dict[str, str]:
    """The sd-parity variables a case worker gets: those set here (SD_PARITY_*), and with --shared-dir
    the run cache and the generated models on the shared folder, so every worker reuses one reference
    and oracle run per configuration and one copy of each fixture model."""
    env = {name: value for name, value in os.environ.items() if name.startswith("SD_PARITY_")}
    if shared_dir is not None:
        shared = shared_dir.expanduser().resolve()
        env.update({RUNS_ENV: str(shared / "runs"), MODELS_ENV: str(shared / "models")})
    return env
