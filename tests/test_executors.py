"""Where cases run: `parity run --jobs N` (local worker processes) and `--executor ray` give the summaries a
single process gives, and the estimates that decide how many cases fit at once.

Each executor runs with its own empty run cache, so every run of the compared cases (reference, fp64
oracle, both candidates free and isolated) is produced by that executor's workers. The cases are the
CI suite's stochastic-sampler pair (euler_ancestral, torch and numpy, calibrated, free and isolated) at
one step: the full suite, both ways, is the slow test at the end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sd_parity.cases.case import Case
from sd_parity.cases.executors import dispatch_order
from sd_parity.cases.resources import ACTIVATIONS_PER_WEIGHT, PROCESS_BYTES, case_memory, local_plan, parameter_count
from sd_parity.cli import main
from sd_parity.paths import RUNS_ENV
from sd_parity.runs.config import RunConfig

CASES = ["--model", "tiny-sd1", "--steps", "1", "--scheduler", "euler_ancestral", "--candidate", "torch", "numpy"]
NAMES = ("txt2img-euler_ancestral-torch-fp32", "txt2img-euler_ancestral-numpy-fp32")


def compared(summary: dict) -> dict:
    """A summary without what depends on when and where it ran: its creation time, the comparisons' timing,
    the run files' paths and names (the run cache's files, or the case folder's links to them) and the
    case folder's own paths."""
    out = {key: value for key, value in summary.items() if key not in ("created", "timing")}
    if out.get("isolated"):
        out["isolated"] = {key: value for key, value in out["isolated"].items() if key != "timing"}
    out["runs"] = {role: run and {key: value for key, value in run.items() if key not in ("path", "name")}
                   for role, run in summary["runs"].items()}
    # where the case's folder was written (a Ray worker's temporary folder, or the report folder)
    out["case"] = {key: value for key, value in summary["case"].items() if key not in ("repro", "script")}
    return out


def run_parity(argv: list[str], cache: Path, capfd) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RUNS_ENV, str(cache))
        code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def summaries(folder: Path) -> dict[str, dict]:
    return {name: json.loads((folder / name / "summary.json").read_text()) for name in NAMES}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`parity run --jobs 2` on the two cases with an empty run cache, as a command (its workers write to the
    file descriptors a module-scoped fixture cannot capture): (exit code, stdout, stderr, output folder)."""
    folder = tmp_path_factory.mktemp("local")
    done = subprocess.run([sys.executable, "-m", "sd_parity", "run", *CASES, "--jobs", "2",
                           "--output-dir", str(folder / "out")], capture_output=True, text=True, timeout=900,
                          env={**os.environ, RUNS_ENV: str(folder / "cache")})
    shutil.rmtree(folder / "cache", ignore_errors=True)  # ~0.2 GB of runs; the summaries are what is compared
    return done.returncode, done.stdout, done.stderr, folder / "out"


def test_parity_run_jobs_2_runs_two_cases_at_once_with_their_reports_and_one_index(local_run):
    code, out, err, folder = local_run
    assert code == 0, err[-3000:]
    assert "parity: 2 cases at once, 1 thread each" in err
    progress = [int(m) for m in re.findall(r"^\[(\d)/2\] ", err, flags=re.M)]
    first_done = max(i for i, number in enumerate(progress) if number == 1)
    assert 2 in progress[:first_done], "the second case started only after the first had finished"
    finished = re.findall(r"^ok +(\S+) +(?:parity|identical): ", out, flags=re.M)
    assert sorted(finished) == sorted(NAMES)
    index = json.loads((folder / "parity.json").read_text())
    assert [case["name"] for case in index["cases"]] == list(NAMES)  # the order of the cases, not of finishing
    assert index["status"] == "parity"
    for name, summary in summaries(folder).items():
        assert summary["verdict"]["status"] == "parity", summary["verdict"]["text"]
        assert summary["case"]["calibrated"] and summary["isolated"] is not None
        counts = summary["coverage"]["counts"]
        assert counts["pass"] == summary["coverage"]["ref_tensors"] > 900  # every tensor of tiny-sd1's step
        assert (folder / name / "report.html").stat().st_size > 0 and (folder / name / "junit.xml").exists()
    junit = (folder / "junit.xml").read_text()
    assert all(f'name="{name}.parity"' in junit for name in NAMES)


def test_the_ray_executor_gives_the_local_executors_summaries(local_run, tmp_path, capfd):
    ray = pytest.importorskip("ray")
    code, _, err, local = local_run
    assert code == 0, err[-3000:]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")  # a local cluster of this machine
    try:
        code, out, err = run_parity(["run", *CASES, "--executor", "ray", "--output-dir", str(tmp_path / "out")],
                                    tmp_path / "cache", capfd)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    assert code == 0, err[-3000:]
    on_ray, here = summaries(tmp_path / "out"), summaries(local)
    for name in NAMES:
        assert on_ray[name]["runs"]["reference"]["path"].startswith(str(tmp_path / "cache"))  # made by Ray's workers
        assert compared(on_ray[name]) == compared(here[name]), name
    # the same report folder, less the links to the run files: those stay in the workers' run cache
    assert {p.name for p in (tmp_path / "out" / NAMES[0]).iterdir()} == {p.name for p in (local / NAMES[0]).iterdir()} - {"runs"}
    index = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert [(c["name"], c["status"], c["verdict"]) for c in index["cases"]] == [
        (c["name"], c["status"], c["verdict"]) for c in json.loads((local / "parity.json").read_text())["cases"]]


def test_without_the_ray_extra_the_ray_executor_is_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what importlib finds when ray is not installed
    code = main(["run", "--model", "tiny-sd1", "--steps", "1", "--candidate", "numpy", "--executor", "ray",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "install sd-parity[ray]" in err and "Traceback" not in err


def test_the_ray_address_needs_the_ray_executor(tmp_path, capsys):
    assert main(["run", "--model", "tiny-sd1", "--ray-address", "auto", "--output-dir", str(tmp_path)]) == 2
    assert "--ray-address is for --executor ray" in capsys.readouterr().err


def test_parameter_count_matches_the_models_own_modules(tiny_model):
    import torch  # noqa: F401 - diffusers' modules
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    modules = [UNet2DConditionModel.from_pretrained(tiny_model / "unet"), AutoencoderKL.from_pretrained(tiny_model / "vae"),
               CLIPTextModel.from_pretrained(tiny_model / "text_encoder")]
    expected = sum(p.numel() for module in modules for p in module.parameters())
    assert parameter_count(tiny_model) == expected


def test_the_memory_estimate_follows_the_widest_run_of_a_case_and_its_image_size(tiny_model):
    params = parameter_count(tiny_model)
    fp16 = RunConfig(model="tiny-sd1", dtype="fp16")  # tiny-sd1's own size: 64x64
    assert case_memory(Case(fp16, "torch")) == int(params * 8 * (1 + ACTIVATIONS_PER_WEIGHT)) + PROCESS_BYTES
    assert case_memory(Case(fp16, "torch", calibrated=False)) == int(params * 4 * 1.7) + PROCESS_BYTES
    big = RunConfig(model="tiny-sd1", height=128, width=128, prompt=["a", "b"])  # 4x the pixels, 2 images
    assert case_memory(Case(big, "torch", calibrated=False)) == int(params * 4 * (1 + 0.7 * 8)) + PROCESS_BYTES


def test_no_more_cases_start_at_once_than_the_memory_holds_and_each_gets_a_share_of_the_cpus(tiny_model, monkeypatch):
    cases = [Case(RunConfig(model="tiny-sd1", scheduler=s), "numpy") for s in ("ddim", "pndm", "euler", "lms")]
    need = case_memory(cases[0])
    monkeypatch.setattr("sd_parity.cases.resources.usable_cpus", lambda: 8)
    monkeypatch.setattr("sd_parity.cases.resources.available_memory", lambda: int(need * 2.5))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = local_plan(cases)
    assert (plan.jobs, plan.threads) == (2, 4)
    assert "2 cases at once, not 4" in plan.note
    monkeypatch.setattr("sd_parity.cases.resources.available_memory", lambda: need * 10)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's cap per process stays a cap
    assert (local_plan(cases, jobs=2).threads, local_plan(cases).threads) == (3, 2)
    assert local_plan(cases, jobs=1) == local_plan(cases, jobs=1, threads=3)
    monkeypatch.setattr("sd_parity.cases.resources.available_memory", lambda: need // 2)
    assert local_plan(cases, jobs=3).jobs == 1  # one case always runs, even where it may not fit


def test_cases_sharing_a_reference_or_an_oracle_do_not_start_together():
    from dataclasses import replace

    ddim = RunConfig(model="tiny-sd1")
    configs = [ddim, replace(ddim, dtype="fp16"), RunConfig(model="tiny-sd1", scheduler="pndm")]
    cases = [Case(config, candidate) for config in configs for candidate in ("torch", "numpy")]
    # ddim fp32 and fp16 share the fp64 oracle, each dtype's two candidates share a reference
    assert dispatch_order(cases) == [0, 4, 2, 5, 1, 3]
    uncalibrated = [replace(case, calibrated=False) for case in cases]
    assert dispatch_order(uncalibrated) == [0, 2, 4, 1, 3, 5]


def test_concurrent_producers_of_one_cached_run_make_it_once(tmp_path, monkeypatch, tiny_model):
    from sd_parity.runs.cache import cached_run

    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    made = []

    def produce(config, path):
        made.append(path)
        time.sleep(0.5)  # long enough for the other thread to find the run missing and wait on its lock
        path.write_bytes(b"run")
        return path

    config = RunConfig(model="tiny-sd1")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(cached_run(config, "reference", produce)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and paths[0] == paths[1] == made[0] and made[0].read_bytes() == b"run"


@pytest.mark.slow
def test_the_ci_suite_gives_the_same_summaries_locally_and_on_ray(tmp_path, monkeypatch):
    """Every case of `parity suite`, a configuration (its torch and numpy cases) at a time, each executor
    with its own empty run cache, removed after each configuration (a 2-core CI machine's small disk)."""
    ray = pytest.importorskip("ray")
    from sd_parity.cases.executors import ExecutorOptions
    from sd_parity.cli.run import execute
    from sd_parity.cli.suite import suite_cases

    cases = suite_cases()
    assert len(cases) == 12
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        for pair in (cases[i:i + 2] for i in range(0, len(cases), 2)):
            for executor in ("local", "ray"):
                monkeypatch.setenv(RUNS_ENV, str(tmp_path / "cache"))
                options = ExecutorOptions(executor, jobs=2)
                assert execute(pair, tmp_path / executor, None, "parity suite", options) == 0
                shutil.rmtree(tmp_path / "cache")
            for case in pair:
                local, on_ray = (json.loads((tmp_path / side / case.name / "summary.json").read_text())
                                 for side in ("local", "ray"))
                assert compared(on_ray) == compared(local), case.name
    finally:
        ray.shutdown()
