"""One thread count for every pool (parity/threads.py), and results that do not depend on machine load."""
import os
import subprocess
import sys

import numpy as np
import pytest

from sd_parity import threads
from sd_parity.cli import build_parser, main
from sd_parity.impl.ops.numpy_ops import NumpyOps


@pytest.fixture
def restore_threads():
    before = {name: os.environ.get(name) for name in threads.THREAD_ENV}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    threads.apply()


def test_default_is_the_affinity_mask_not_the_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert threads.default_threads() == 1


def test_default_respects_a_smaller_omp_num_threads_and_caps_a_larger_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert threads.default_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")  # a nested-parallelism list: the outer level counts
    assert threads.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert threads.default_threads() == 4


def test_apply_sets_torch_blas_and_impl_pools(restore_threads):
    import torch
    from threadpoolctl import threadpool_info

    assert threads.apply(1) == 1
    assert torch.get_num_threads() == 1
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas)
    assert NumpyOps().threads == 1  # impl's own pool takes the count from OMP_NUM_THREADS
    assert all(os.environ[name] == "1" for name in threads.THREAD_ENV)
    assert threads.current_threads() == 1


def test_a_torch_imported_later_takes_the_count_from_the_environment():
    code = ("from sd_parity import threads; threads.apply(1); import torch; "
            "print(torch.get_num_threads(), threads.current_threads())")
    env = {k: v for k, v in os.environ.items() if k not in threads.THREAD_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_numpy_model_calls_hold_blas_to_one_thread_and_restore_it(restore_threads):
    from threadpoolctl import threadpool_info

    threads.apply(2)
    ops = NumpyOps(threads=2)
    with ops.inference():
        inside = [lib["num_threads"] for lib in threadpool_info() if lib["internal_api"] == "openblas"]
    after = [lib["num_threads"] for lib in threadpool_info() if lib["internal_api"] == "openblas"]
    assert inside and set(inside) == {1}
    assert set(after) == {2}


def test_every_command_takes_threads_and_refuses_a_bad_count(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        assert any("--threads" in action.option_strings for action in command._actions), name
    assert main(["inspect", "--threads", "0", "run.h5"]) == 2
    assert "not a thread count" in capsys.readouterr().err


def test_run_metadata_records_threads_and_device(tiny_model):
    from sd_parity.runs.config import RunConfig, run_metadata

    config = RunConfig(model="tiny-sd1", steps=1)
    meta = run_metadata(config, impl="reference", model_dir=tiny_model, x_t=config.initial_noise(),
                        scheduler_config={})
    assert meta["threads"] == threads.current_threads()
    assert meta["device"] == "cpu"


def _busy_process():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_torch_backend_is_bit_identical_beside_a_busy_process(tiny_model):
    """The reduction order is pinned (thread count, alignment): load on the machine changes nothing.
    Batch 1 takes MKL's matrix-vector paths (alignment-sensitive), batch 2 the GEMM ones."""
    import torch
    from diffusers import UNet2DConditionModel

    from sd_parity.impl.models import load_unet
    from sd_parity.impl.ops import get_ops

    reference = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    unet = load_unet(tiny_model, get_ops("torch", "fp32"))
    rng = np.random.default_rng(3)
    busy = _busy_process()
    try:
        for batch in (1, 2, 1, 2):
            sample = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
            context = rng.standard_normal((batch, 77, 32)).astype(np.float32)
            with torch.inference_mode():
                expected = reference(torch.from_numpy(sample), torch.tensor(321), torch.from_numpy(context)).sample
                got = unet(sample, 321, context)
            assert torch.equal(got, expected), f"batch {batch}: max |d| {(got - expected).abs().max().item():.3g}"
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.slow
def test_bit_identity_suite_beside_a_busy_process():
    """tests/test_impl_models.py's bit-identity tests (torch backend, every dtype, every block) while
    another process keeps a core busy: the heavier proof behind docs/precision.md's claim."""
    busy = _busy_process()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "tests/test_impl_models.py", "-k", "torch"],
                                capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    finally:
        busy.kill()
        busy.wait()
    assert result.returncode == 0, result.stdout[-3000:]


def _blas_choice(env: dict) -> list[str]:
    code = ("import os, sd_parity.threads, numpy; from threadpoolctl import threadpool_info; "
            "print(os.environ.get('OPENBLAS_CORETYPE'), [l.get('architecture') for l in threadpool_info() "
            "if l['internal_api'] == 'openblas'][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


def test_openblas_gets_avx512_kernels_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    with open("/proc/cpuinfo") as cpuinfo:
        avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= set(cpuinfo.read().split())
    chosen, loaded = _blas_choice(env)
    if avx512:
        assert chosen == loaded == "SkylakeX"
    else:
        assert chosen == "None"
    assert _blas_choice({**env, "OPENBLAS_CORETYPE": "Haswell"}) == ["Haswell", "Haswell"]  # the user's choice
