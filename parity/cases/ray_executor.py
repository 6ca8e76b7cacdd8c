"""Cases as Ray tasks (`--executor ray [--ray-address ADDRESS]`, the sd-parity[ray] extra).

Each case is one task that asks for what the case needs (its threads as CPUs, a GPU when its device
is cuda, its memory estimate), runs and compares on the worker, and returns the summary and the files
of its report folder; the driver writes them under --output-dir. Run files stay in the worker's run
cache, which with --shared-dir is a folder every node sees (docs/scaling.md). Every node needs the
same sd-parity and libraries as the driver, and the model folders (and image or port files) at the
same absolute paths.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from sd_parity.errors import SdParityError, require_extra
from sd_parity.judging.tolerances import Tolerances
from sd_parity.threads import environment as thread_environment

from .case import Case, CaseResult
from .executors import ExecutorOptions, Finished, dispatch_order, enter_worker, run_numbered
from .resources import GIB, case_memory, shared_environment

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # a worker never reaches a model hub either


def run_on_ray(cases: list[Case], output_dir: Path, tolerances: Tolerances | None, options: ExecutorOptions,
               finished: Finished) -> list[CaseResult]:
    require_extra("--executor ray", ("ray",), extra="ray")
    import ray

    threads = options.threads or 1
    env = {**thread_environment(threads), **shared_environment(options.shared_dir), **OFFLINE}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.ray_address, include_dashboard=False, logging_level="WARNING")
    pending: dict = {}
    try:
        needs = [case_needs(case, threads) for case in cases]
        warn_unschedulable(cases, needs, ray.nodes())
        task = ray.remote(case_task)
        order, results = dispatch_order(cases), [None] * len(cases)
        limit = options.jobs or len(cases)
        while order or pending:
            while order and len(pending) < limit:
                position = order.pop(0)
                ref = task.options(**needs[position], runtime_env={"env_vars": env}).remote(
                    position + 1, len(cases), cases[position], tolerances, env, threads)
                pending[ref] = position
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            position = pending.pop(ref)
            results[position] = unpack(_get(ray, ref), cases[position], output_dir / cases[position].name)
            finished(position, results[position])
        return results
    finally:
        for ref in pending:  # a failure or Ctrl-C: the cases still queued or running are dropped
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def case_needs(case: Case, threads: int) -> dict:
    """The Ray resources of one case's task."""
    return {"num_cpus": threads, "num_gpus": 1 if case.config.device.startswith("cuda") else 0,
            "memory": case_memory(case)}


def warn_unschedulable(cases: list[Case], needs: list[dict], nodes: list[dict]) -> None:
    """Say so when no node of the cluster can take a case: Ray would wait silently for one to join."""
    alive = [node["Resources"] for node in nodes if node.get("Alive")]
    for case, need in zip(cases, needs):
        fits = any(node.get("CPU", 0) >= need["num_cpus"] and node.get("GPU", 0) >= need["num_gpus"]
                   and node.get("memory", 0) >= need["memory"] for node in alive)
        if not fits:
            print(f"parity: no node of the Ray cluster has {need['num_cpus']} CPU, {need['num_gpus']} GPU and "
                  f"{need['memory'] / GIB:.1f} GiB of memory for {case.name}: it waits until such a node joins",
                  file=sys.stderr, flush=True)


def case_task(number: int, total: int, case: Case, tolerances: Tolerances | None, env: dict[str, str],
              threads: int) -> tuple[CaseResult, dict[str, bytes]]:
    """On the worker: run the case into a temporary folder and return its result and that folder's files."""
    enter_worker(env, threads)
    with tempfile.TemporaryDirectory(prefix="sd-parity-case-") as tmp:
        # the run files stay in the worker's run cache (shared with --shared-dir): the report folder travels
        # back to the driver as bytes, and a full-size run is gigabytes
        result = run_numbered(number, total, case, Path(tmp) / case.name, tolerances, link_runs=False)
        files = {path.relative_to(result.out_dir).as_posix(): path.read_bytes()
                 for path in sorted(result.out_dir.rglob("*")) if path.is_file()}
    return result, files


def unpack(returned: tuple[CaseResult, dict[str, bytes]], case: Case, out_dir: Path) -> CaseResult:
    """Write a returned case's report folder as out_dir (whole: written beside it, then renamed into place);
    the result now points there."""
    result, files = returned
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return CaseResult(case, result.summary, out_dir, result.seconds, result.runs)


def _get(ray, ref):
    """The task's return; a harness error raised on the worker (bad input) is raised here as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, SdParityError):
            raise exc.cause from None
        raise
