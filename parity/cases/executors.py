"""Where the cases of `parity run` and `parity suite` run: one after another in this process, side by side
in local worker processes (`--jobs N`), or as Ray tasks on a cluster (`--executor ray`, ray_executor.py).

Every executor runs the same case with the same tolerances and an explicit thread count, and the run
cache produces each reference and oracle run once however many cases share it, so a case's summary
is the same whichever executor ran it (its `created` time and `timing` aside). Each case writes its
own report folder; the index over all of them is written by the caller once every case has returned.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from sd_parity.errors import SdParityError
from sd_parity.judging.tolerances import Tolerances
from sd_parity.progress import Phases
from sd_parity.threads import apply as apply_threads, environment as thread_environment

from .case import Case, CaseResult, run_case
from .resources import local_plan, shared_environment

EXECUTORS = ("local", "ray")

Finished = Callable[[int, CaseResult], None]  # (the case's position in the list, its result), as each returns


@dataclass(frozen=True)
class ExecutorOptions:
    executor: str = "local"
    jobs: int | None = None  # cases at once (local: default as many as the CPUs and memory allow)
    threads: int | None = None  # threads per case (default: local, the CPUs split among the jobs; Ray, 1)
    ray_address: str | None = None  # None: a running local Ray instance, else a new one
    shared_dir: Path | None = None  # a folder every worker sees: the run cache and fixture models go there


class CaseWorkerDied(SdParityError):
    """A local case worker ended without returning its case (killed, most often for memory)."""


def run_cases(cases: list[Case], output_dir: Path, tolerances: Tolerances | None, options: ExecutorOptions,
              finished: Finished, phases: Phases | None = None) -> list[CaseResult]:
    """Run every case (report folder: output_dir / case.name); results in the order of `cases`. Cases run
    in this process announce their phases on `phases` (a progress bar); the others print lines."""
    os.environ.update(shared_environment(options.shared_dir))  # this process reads the caches too
    if options.executor == "ray":
        from .ray_executor import run_on_ray

        return run_on_ray(cases, output_dir, tolerances, options, finished)
    return run_locally(cases, output_dir, tolerances, options, finished, phases)


def run_numbered(number: int, total: int, case: Case, out_dir: Path, tolerances: Tolerances | None,
                 phases: Phases | None = None, link_runs: bool = True) -> CaseResult:
    """One case, its phases on `phases`, by default as lines on stderr prefixed [number/total]."""
    phases = phases or Phases(0, total, enabled=False)
    phases.case(number)
    return run_case(case, out_dir, tolerances, phases.start, progress=phases.drawing, link_runs=link_runs)


def enter_worker(env: dict[str, str], threads: int) -> None:
    """Set up a fresh case worker: sd-parity's variables and its thread count, before torch or BLAS load."""
    os.environ.update(env)
    apply_threads(threads)


def dispatch_order(cases: list[Case]) -> list[int]:
    """Case positions in the order to start them, so that cases starting together make different runs
    rather than wait for one another's: one case per fp64 oracle first (an oracle serves every dtype of
    a configuration), and within an oracle's cases one per reference first."""
    by_oracle: dict[str, dict[str, list[int]]] = {}
    for position, case in enumerate(cases):
        oracle = dataclasses.replace(case.config, dtype="fp64") if case.calibrated else case.config
        by_oracle.setdefault(repr(oracle), {}).setdefault(repr(case.config), []).append(position)
    return _interleave([_interleave(list(references.values())) for references in by_oracle.values()])


def _interleave(groups: list[list[int]]) -> list[int]:
    """The first of each group, then the second of each, ..."""
    return [p for row in itertools.zip_longest(*groups) for p in row if p is not None]


def run_locally(cases: list[Case], output_dir: Path, tolerances: Tolerances | None, options: ExecutorOptions,
                finished: Finished, phases: Phases | None = None) -> list[CaseResult]:
    plan = local_plan(cases, options.jobs, options.threads)
    if plan.note:
        print(f"parity: {plan.note}", file=sys.stderr, flush=True)
    results: list[CaseResult | None] = [None] * len(cases)
    if plan.jobs == 1:  # in this process: nothing to share the CPUs with
        for position, case in enumerate(cases):
            results[position] = run_numbered(position + 1, len(cases), case, output_dir / case.name, tolerances,
                                             phases)
            finished(position, results[position])
        return results
    env = {**thread_environment(plan.threads), **shared_environment(options.shared_dir)}
    print(f"parity: {plan.jobs} cases at once, {plan.threads} thread{'s' if plan.threads > 1 else ''} each",
          file=sys.stderr, flush=True)
    # spawn, not fork: a forked worker would inherit this process's thread pools and loaded libraries
    pool = ProcessPoolExecutor(plan.jobs, mp_context=get_context("spawn"), initializer=enter_worker,
                               initargs=(env, plan.threads))
    try:
        # workers print their phases as lines, unless this process draws a bar over all cases
        quiet = Phases(0, len(cases), enabled=False, lines=False) if phases and phases.drawing else None
        if quiet:
            phases.begin()
        futures = {pool.submit(run_numbered, p + 1, len(cases), cases[p], output_dir / cases[p].name, tolerances,
                               quiet): p
                   for p in dispatch_order(cases)}
        for future in as_completed(futures):
            position = futures[future]
            try:
                results[position] = future.result()
            except BrokenProcessPool:
                raise CaseWorkerDied(
                    f"a case worker died before {cases[position].name} returned (killed, most often for memory); "
                    f"run fewer cases at once (--jobs) or on a machine with more memory") from None
            finished(position, results[position])
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    return results


def _stop(pool: ProcessPoolExecutor) -> None:
    """Drop the queued cases and end the running ones: a failure or Ctrl-C leaves no worker behind."""
    processes = list((pool._processes or {}).values())  # noqa: SLF001 - Python 3.14: pool.terminate_workers()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()
