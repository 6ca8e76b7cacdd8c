"""sd-parity as a user installs it: a built wheel (not editable) in a fresh venv, run from a folder
outside the checkout, writing nothing into site-packages, the current folder or the checkout.

The wheel and its venv are built once per session (torch from the cached CPU wheel, pip's cache
reused, nothing compiled at install but our own package) and removed at the end of the session.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> installed package, as pyproject.toml's [tool.setuptools.package-dir] maps them.
PACKAGE_FOLDERS = {"parity": "sd_parity", "impl": "sd_parity.impl", "reference": "sd_parity.reference",
                   "fixtures": "sd_parity.fixtures"}
TORCH = "torch==2.13.0"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> dict[str, Path]:
    """Installed package name -> folder, for every folder under the mapped roots that holds Python code."""
    found = {}
    for folder, package in PACKAGE_FOLDERS.items():
        for directory in [ROOT / folder, *sorted(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in directory.parts or not any(directory.glob("*.py")):
                continue
            relative = directory.relative_to(ROOT / folder).parts
            found[".".join([package, *relative])] = directory
    return found


def test_every_package_folder_is_listed_in_pyproject():
    settings = _pyproject()["tool"]["setuptools"]
    assert settings["package-dir"] == {"sd_parity": "parity", **{p: f for f, p in PACKAGE_FOLDERS.items()
                                                                 if p != "sd_parity"}}
    folders = _package_folders()
    assert sorted(settings["packages"]) == sorted(folders), "pyproject.toml's packages list is out of date"
    missing_init = [str(d.relative_to(ROOT)) for d in folders.values() if not (d / "__init__.py").exists()]
    assert not missing_init, f"package folders without __init__.py: {missing_init}"


def _tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
    return [name for name in listing.split("\0") if name and (ROOT / name).is_file()]


def _checkout_state() -> set[str]:
    """`git status` of the checkout, ignored files included (Python's own __pycache__ left out)."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    return {line for line in status.splitlines() if "__pycache__" not in line}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout's files (the build writes build/ and egg-info there)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    for name in _tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "dist")], check=True, capture_output=True)
    return next((work / "dist").glob("sd_parity-*.whl"))


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory):
    """A fresh venv with the wheel and its `reference` extra installed; removed after the session."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    for requirement in (TORCH, f"{wheel}[reference]"):  # the CPU torch first, as the README says
        done = subprocess.run(pip + [requirement], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    site = next((venv / "lib").glob("python3*/site-packages"))
    subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", str(site / "sd_parity")], check=True)
    yield venv, site
    shutil.rmtree(venv, ignore_errors=True)


def _snapshot(site: Path) -> dict[str, tuple[int, int]]:
    """Every file of the installed package, and the names at the top of site-packages."""
    files = {str(p.relative_to(site)): (p.stat().st_size, p.stat().st_mtime_ns)
             for p in (site / "sd_parity").rglob("*") if p.is_file()}
    return {**files, **{f"top:{p.name}": (0, 0) for p in site.iterdir()}}


def _environment(venv: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
           and not k.startswith("SD_PARITY_")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", SD_PARITY_CACHE_DIR=str(cache),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def test_wheel_ships_what_runs_need(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [name for name in _tracked_files() if name.split("/", 1)[0] in PACKAGE_FOLDERS and not name.endswith(".py")]
    installed_as = {name: "/".join([PACKAGE_FOLDERS[name.split("/", 1)[0]].replace(".", "/"), name.split("/", 1)[1]])
                    for name in data}
    assert data and not [n for n, target in installed_as.items() if target not in names], "package data missing"
    assert not [n for n in names if n.split("/", 1)[0] not in ("sd_parity", f"{wheel.name.split('-')[0]}-"
                                                               f"{wheel.name.split('-')[1]}.dist-info")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "parity = sd_parity.cli:main" in text and "sd_parity = sd_parity.pytest_plugin" in text


def test_installed_tool_runs_from_any_folder(installed, tmp_path):
    venv, site = installed
    before_site, before_checkout = _snapshot(site), _checkout_state()
    work, cache = tmp_path / "elsewhere", tmp_path / "cache"
    work.mkdir()
    for shadow in ("reference", "impl", "fixtures"):  # a user's own folders cannot shadow the package's
        (work / shadow).mkdir()
        (work / shadow / "__init__.py").write_text("raise RuntimeError('shadowed by the current folder')\n")
    env = _environment(venv, cache)

    def parity(*args: str, expect: int = 0, module: bool = False) -> str:
        command = [str(venv / "bin" / "python"), "-m", "sd_parity"] if module else [str(venv / "bin" / "parity")]
        done = subprocess.run(command + list(args), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == expect, f"parity {' '.join(args)}: exit {done.returncode}\n{done.stderr[-4000:]}"
        return done.stdout

    assert "Layer-by-layer parity" in parity("--help")
    assert parity("--version").strip() == f"parity (sd-parity) {_pyproject()['project']['version']}"
    parity("run", "--model", "tiny-sd1", "--steps", "1", "--candidate", "numpy", "--output-dir", "report", module=True)
    summary = json.loads(next((work / "report").glob("*/summary.json")).read_text())
    assert summary["verdict"]["status"] == "parity" and summary["mode"]["calibrated"] and summary["isolated"]
    # the run files it left in the user cache, compared again as a port's own files would be
    runs = {run["metadata"]["impl"] + "-" + run["metadata"]["dtype"] + "-" + run["metadata"]["mode"]: run["path"]
            for run in summary["runs"].values() if run}
    output = parity("compare", runs["reference-fp32-free"], runs["numpy-fp32-free"], "--oracle",
                    runs["reference-fp64-free"], "--isolated", runs["numpy-fp32-isolated"], "--output-dir", "cmp")
    assert "verdict: PARITY" in output and (work / "cmp" / "report.html").is_file()

    made = {p.relative_to(work).parts[0] for p in work.iterdir()}
    assert made == {"reference", "impl", "fixtures", "report", "cmp"}, "wrote into the current folder"
    assert (cache / "models" / "tiny-sd1" / "unet").is_dir() and any((cache / "runs").glob("*.h5"))
    after_site = _snapshot(site)
    assert after_site == before_site, f"wrote into site-packages: {sorted(set(after_site) ^ set(before_site))[:5]}"
    assert _checkout_state() == before_checkout, "an installed command wrote into the checkout"


def test_commands_leave_the_checkout_clean(tmp_path):
    """Run from the checkout itself (editable install), the commands write only where they are told."""
    before = _checkout_state()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    parity = str(Path(sys.executable).parent / "parity")
    small = ["--model", "tiny-sd1", "--steps", "1"]
    for args in (["fixtures", "tiny-sd1"],
                 ["capture", "--candidate", "numpy", *small, "--output", str(tmp_path / "c.h5")],
                 ["run", "--candidate", "torch", *small, "--mode", "free", "--no-calibrate",
                  "--output-dir", str(tmp_path / "out")],
                 ["inspect", str(tmp_path / "c.h5")], ["--version"]):
        done = subprocess.run([parity, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"parity {' '.join(args)}: {done.stderr[-2000:]}"
    assert _checkout_state() == before
