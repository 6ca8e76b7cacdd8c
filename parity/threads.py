"""How many threads the tool computes with, applied to every thread pool in the process.

One count, N, for all of them: torch's intra-op pool (OpenMP) and its inter-op pool, the BLAS
libraries NumPy and torch link (OpenBLAS, MKL: via threadpoolctl for those already loaded, via their
environment variables for those loaded later), and impl's NumPy worker pool (which reads
OMP_NUM_THREADS). The default never asks for more threads than the CPUs this process may run on
(os.sched_getaffinity), and an OMP_NUM_THREADS the user set lowers it further.

OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning: on a shared machine a
spinning team keeps its cores busy between the many small ops of a model call, and when another
process holds one of them every parallel region waits for a descheduled thread (a tiny-sd1 txt2img
ran 8x slower beside one busy process, 65x with spinning forced; docs/benchmarks.md).

The thread count also decides reduction order: oneDNN picks its convolution kernels by it, so
torch's results differ in the last bits between N=1 and N=2 (docs/precision.md). It is fixed for the
life of the process (OMP_DYNAMIC=FALSE), run caches are keyed on it and run files record it.

Importing this module (the `parity` command does so before NumPy loads) also picks OpenBLAS's
AVX-512 kernels on AVX-512 CPUs it would not recognise (select_blas_kernels).
"""
from __future__ import annotations

import argparse
import os
import sys

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what OpenBLAS's SkylakeX kernels use


def select_blas_kernels() -> str | None:
    """On a CPU with AVX-512, have OpenBLAS use its AVX-512 (SkylakeX) kernels; returns the choice.

    OpenBLAS picks its kernels by CPU model when it loads, and a CPU it does not know falls back to
    an older family: NumPy's OpenBLAS 0.3.31 runs its AVX2 (Haswell) kernels on AMD Zen 5 (family 26),
    at half the speed of its AVX-512 ones (docs/benchmarks.md). OPENBLAS_CORETYPE overrides that, read
    when NumPy loads it, so this runs on import, before NumPy is imported; a value the user set stays."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return os.environ["OPENBLAS_CORETYPE"]
    if "numpy" in sys.modules:
        return None  # too late: OpenBLAS has chosen
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return None
    if not _AVX512 <= flags:
        return None
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    return "SkylakeX"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def env_threads() -> int | None:
    """OMP_NUM_THREADS as a count (its first entry: "4,2" is a nested-parallelism list), or None."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_threads() -> int:
    """The usable CPUs, or OMP_NUM_THREADS when it is set and smaller."""
    return min(usable_cpus(), env_threads() or usable_cpus())


def current_threads() -> int:
    """The count every pool was set to by apply() (or would get by default)."""
    return env_threads() or default_threads()


def reduction_order() -> dict:
    """What, beyond the code and the libraries, decides the summation order of a run on this machine:
    the thread count (oneDNN picks kernels by it) and OpenBLAS's kernel family."""
    return {"threads": current_threads(), "openblas_kernels": os.environ.get("OPENBLAS_CORETYPE")}


def environment(threads: int) -> dict[str, str]:
    """The variables that set every pool of a process to `threads`: libraries this process loads later,
    and child processes (an executor's workers), read them."""
    # OMP_DYNAMIC: libgomp would otherwise size teams by the load average, another reduction order
    return {**{name: str(threads) for name in THREAD_ENV}, "OMP_DYNAMIC": "FALSE"}


def apply(threads: int | None = None) -> int:
    """Set every pool of this process to `threads` (default: default_threads()); returns the count.

    Libraries loaded later (torch, typically, imported lazily) take the count from the environment
    variables set here, which child processes inherit too."""
    count = int(threads) if threads else default_threads()
    os.environ.update(environment(count))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when libgomp loads: before torch's import
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=count)  # BLAS/OpenMP libraries already loaded (NumPy's OpenBLAS)
    if sys.modules.get("torch") is not None:  # already imported (None marks an import that failed or is barred)
        pin_torch()
    return count


def pin_torch() -> None:
    """torch's intra-op pool to the current count and its inter-op pool to one thread (eager mode never
    runs ops concurrently; the pool only exists to serve torch.jit.fork). The inter-op count can be set
    only before torch first uses that pool; later it stays as it was."""
    import torch

    torch.set_num_threads(current_threads())
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def positive_count(text: str) -> int:
    """argparse type of --threads: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count; give a whole number >= 1")
    return value


def add_threads_argument(parser: argparse.ArgumentParser, default=None) -> None:
    parser.add_argument("--threads", type=positive_count, default=default, metavar="N",
                        help=f"threads for torch, BLAS and impl's NumPy pool (default: the usable CPUs, "
                             f"{default_threads()} here, or OMP_NUM_THREADS if smaller)")


select_blas_kernels()


__all__ = ["add_threads_argument", "apply", "current_threads", "default_threads", "env_threads", "environment",
           "pin_torch", "reduction_order", "select_blas_kernels", "usable_cpus"]
