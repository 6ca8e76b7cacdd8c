"""Nothing lost, nothing half-written, on any fault: a full disk (a real small tmpfs where one can be mounted,
else an injected ENOSPC), read-only targets, SIGINT/SIGTERM/SIGHUP, kill -9, non-regular output paths,
the umask, a broken pipe, and HDF5 itself looping or crashing on a corrupt file."""
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from crafted import small_tensors, write_run
from sd_parity import outputs
from sd_parity.cli import main
from sd_parity.errors import Interrupted, OutputError, RunFileError
from sd_parity.interrupts import critical, handled
from sd_parity.runs import hdf5
from sd_parity.runs.hdf5 import RunReader, validate

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
CAPTURE = [sys.executable, "-m", "sd_parity", "capture", "--candidate", "numpy", "--model", "tiny-sd1"]


def parity(*argv, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd_parity", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, timeout=600, **options)


@contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A small tmpfs at `path` (skips where mounting is not allowed); `readonly` remounts it read-only
    after the caller's setup ran (the generator's first yield)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the injected-ENOSPC tests cover it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_readonly(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def assert_clean_bad_input(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and words in result.stderr, result.stderr


# --- disk full -----------------------------------------------------------------------------------------

def test_capture_onto_a_full_disk_stops_cleanly(tmp_path):
    with tmpfs(tmp_path / "disk", "3m") as disk:
        result = subprocess.run([*CAPTURE, "--steps", "2", "--output", disk / "run.h5"], capture_output=True,
                                text=True, env=ENV, timeout=600)
        assert_clean_bad_input(result, "is full")
        assert list(disk.iterdir()) == []


def test_a_write_that_fails_inside_hdf5_exits_2_not_139(tmp_path):
    """Past the free-space guard (another process filled the disk): HDF5 fails mid-write, and its own exit
    handler would crash the interpreter afterwards (exit 139 and thousands of tracebacks, before this fix)."""
    script = ("import sys; from sd_parity.runs.hdf5 import RunWriter; RunWriter._ensure_space = lambda *a: None; "
              "from sd_parity.cli import main; sys.argv[0] = 'parity'; sys.exit(main())")
    with tmpfs(tmp_path / "disk", "3m") as disk:
        result = subprocess.run([sys.executable, "-c", script, *CAPTURE[3:], "--steps", "2", "--output",
                                 disk / "run.h5"], capture_output=True, text=True, env=ENV, timeout=600)
        assert_clean_bad_input(result, "the disk is full")
        assert result.stderr.count("\n") < 5
        assert list(disk.iterdir()) == []


def _old_set(folder: Path) -> dict[str, bytes]:
    old = {name: f"old {name}".encode() for name in ("summary.json", "junit.xml", "report.html")}
    for name, data in old.items():
        (folder / name).write_bytes(data)
    return old


def test_compare_outputs_on_a_full_disk_leave_the_old_set_whole(tmp_path, capsys):
    ref = write_run(tmp_path / "ref.h5")
    cand = write_run(tmp_path / "cand.h5", small_tensors(value=np.arange(16, dtype=np.float32) + 1))
    with tmpfs(tmp_path / "disk", "256k") as disk:
        old = _old_set(disk)
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to the last block
        try:
            while True:
                os.write(filler, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(filler)
        code = main(["compare", str(ref), str(cand), "--output-dir", str(disk)])
        err = capsys.readouterr().err
        assert code == 2 and "disk is full" in err and "Traceback" not in err
        assert {p.name: p.read_bytes() for p in disk.iterdir() if p.name != "filler"} == old


def test_an_injected_enospc_in_the_output_set_keeps_the_old_set(tmp_path, monkeypatch):
    old = _old_set(tmp_path)
    real = outputs._write_file
    calls = []

    def fail_second(path, content):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, content)

    monkeypatch.setattr(outputs, "_write_file", fail_second)
    with pytest.raises(OutputError, match="the disk is full"):
        outputs.write_set(tmp_path, {name: "new" for name in old}, marker="summary.json")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_an_output_set_never_mixes_two_runs(tmp_path, monkeypatch):
    """Watch the folder after every rename and removal: summary.json exists only with its own companions."""
    _old_set(tmp_path)
    seen = []
    real_replace, real_unlink = os.replace, Path.unlink

    def snapshot():
        seen.append({p.name: p.read_bytes()[:3] for p in tmp_path.iterdir() if not p.name.startswith(".")})

    monkeypatch.setattr(outputs.os, "replace", lambda a, b: (real_replace(a, b), snapshot()))
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (real_unlink(self, missing_ok), snapshot()))
    outputs.write_set(tmp_path, {"summary.json": "new", "junit.xml": "new", "report.html": "new"},
                      marker="summary.json")
    for state in seen:
        assert len(set(state.values())) <= 1, state  # never old and new side by side
        assert "summary.json" not in state or len(state) == 3
    assert seen[-1] == {"summary.json": b"new", "junit.xml": b"new", "report.html": b"new"}


def test_a_signal_inside_the_swap_waits_for_its_end():
    done = []
    with handled():
        with pytest.raises(Interrupted):
            with critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("swap finished")
    assert done == ["swap finished"]


# --- read-only, non-regular, umask ---------------------------------------------------------------------

def test_read_only_targets(tmp_path):
    ref = write_run(tmp_path / "ref.h5")
    with tmpfs(tmp_path / "ro", "1m") as folder:
        _old_set(folder)
        remount_readonly(folder)
        assert_clean_bad_input(parity("capture", "--candidate", "numpy", "--model", "tiny-sd1", "--steps", "1",
                                      "--output", folder / "run.h5"), "not writable")
        assert_clean_bad_input(parity("compare", ref, ref, "--output-dir", folder), "not writable")
        assert_clean_bad_input(parity("report", folder / "summary.json", "--output", folder / "r.html"), "")


def test_outputs_that_are_not_regular_files_are_refused(tmp_path, capsys):
    ref = write_run(tmp_path / "ref.h5")
    fifo = tmp_path / "run.h5.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "junit.xml")
    (out / "report.html").symlink_to(tmp_path / "elsewhere.html")
    for argv in (["capture", "--candidate", "numpy", "--model", "tiny-sd1", "--steps", "1", "--output", fifo],
                 ["compare", ref, ref, "--output-dir", out]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and "not a regular file" in err and "left alone" in err, err
    code = main(["compare", str(ref), str(ref), "--output-dir", str(tmp_path / "out2")])
    capsys.readouterr()
    assert code == 0
    code = main(["report", str(tmp_path / "out2" / "summary.json"), "--output", "/dev/null"])
    assert code == 2 and "a character device" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISFIFO(os.lstat(out / "junit.xml").st_mode)
    assert (out / "report.html").is_symlink() and not (out / "summary.json").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, capsys, umask, mode):
    previous = os.umask(umask)
    try:
        run = write_run(tmp_path / "run.h5")
        assert main(["compare", str(run), str(run), "--output-dir", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    for path in (run, *(tmp_path / "out").iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# --- signals and kill -9 -------------------------------------------------------------------------------

def _start_capture(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([*CAPTURE, "--steps", "30", "--output", folder / "run.h5"], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".run.h5.tmp-") for p in folder.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_clean_up_and_exit_3(tmp_path, signum):
    process = _start_capture(tmp_path)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 3, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_capture_is_never_read_as_complete_and_the_next_run_removes_it(tmp_path):
    process = _start_capture(tmp_path)
    process.kill()
    process.communicate(timeout=60)
    (stale,) = tmp_path.iterdir()
    assert any("not marked complete" in p or "not a readable" in p for p in validate(stale))
    with pytest.raises(RunFileError):
        RunReader(stale)
    alive = tmp_path / f".other.h5.tmp-{outputs._HOST}-{os.getppid()}"  # a live process's: left alone
    alive.write_bytes(b"")
    write_run(tmp_path / "next.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "next.h5"])


# --- broken pipe ---------------------------------------------------------------------------------------

def test_a_closed_pipe_exits_2_without_a_traceback(tmp_path):
    long_name = "block." + "x" * 200
    run = write_run(tmp_path / "run.h5", {("unet", "step_000", f"{long_name}{i}"): np.zeros(1, np.float32)
                                          for i in range(600)})
    result = subprocess.run(["bash", "-c", f'"{sys.executable}" -m sd_parity inspect "{run}" --tensors | head -1; '
                             'exit "${PIPESTATUS[0]}"'], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "broken pipe" in result.stderr and "Traceback" not in result.stderr and "Exception" not in result.stderr


# --- HDF5 looping or crashing on a corrupt file ---------------------------------------------------------

@pytest.mark.parametrize("failure, words", [("crash", "crashed"), ("hang", "made no progress")])
def test_hdf5_looping_or_crashing_is_reported_as_a_corrupt_file(tmp_path, monkeypatch, failure, words):
    def broken(self):
        if failure == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(600)

    monkeypatch.setattr(hdf5._Examiner, "run", broken)
    monkeypatch.setattr(hdf5, "STALL_SECONDS", 1.0)
    monkeypatch.setattr(hdf5, "_can_fork", lambda: True)
    path = write_run(tmp_path / f"{failure}.h5")
    started = time.monotonic()
    with pytest.raises(RunFileError, match=words):
        RunReader(path)
    assert time.monotonic() - started < 30


def test_a_run_file_cache_entry_is_not_confused_by_a_rewrite(tmp_path):
    path = write_run(tmp_path / "run.h5")
    with RunReader(path) as reader:
        assert len(reader.entries()) == 2
    time.sleep(0.01)
    write_run(path, {**small_tensors(), ("unet", "step_001", "x"): np.zeros(2, np.float32)})
    with RunReader(path) as reader:
        assert len(reader.entries()) == 3
    assert json.loads(json.dumps(reader.metadata)) == {"seed": 0}
