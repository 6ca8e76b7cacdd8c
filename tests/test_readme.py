"""The README runs as written (docs that drift are worse than none): its Python example, and every
command of its ```sh blocks, in order, in an empty folder outside the checkout, on tiny-sd1."""
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_parity.fixtures import ensure_fixture
from sd_parity.reports.summary import load_summary

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(monkeypatch, tmp_path):
    ensure_fixture("tiny-sd1")
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "README.md", "exec"), {})
    printed = output.getvalue()
    assert "numpy (1, 64, 64, 3)" in printed and "torch (1, 64, 64, 3)" in printed
    assert "\ndown_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q (2, " in printed
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def readme_commands() -> list[tuple[str, int]]:
    """(command, expected exit code) for each line of the README's ```sh blocks; `# exit N` says N."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.splitlines():
            if line.strip():
                expected = re.search(r"#\s*exit (\d)", line)
                commands.append((line, int(expected.group(1)) if expected else 0))
    return commands


def test_every_readme_command_runs_as_written(tmp_path):
    """What a new user types, from a folder of their own: `parity` on PATH, their port in my_port/ and
    their program `my-port` (here our stand-ins: tests/ports/numpy_port.py and tests/standin_port.py)."""
    commands = readme_commands()
    assert len(commands) >= 20 and all(c.startswith("parity ") for c, _ in commands)
    work = tmp_path / "work"
    (work / "my_port").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "ports" / "numpy_port.py", work / "my_port" / "parity.py")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "my-port"
    program.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "standin_port.py"}" "$@"\n')
    program.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    for command, expected in commands:
        started = time.perf_counter()
        done = subprocess.run(["sh", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        print(f"{time.perf_counter() - started:6.1f} s  {command[:100]}")
        assert done.returncode == expected, f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr and "note:" not in done.stderr, f"{command}\n{done.stderr[-2000:]}"

    # what the commands left where the README says
    assert (work / "cand-parity" / "report.html").is_file()
    assert load_summary(work / "cand-parity" / "summary.json")["verdict"]["status"] == "parity"
    case = work / "reports" / "mine" / "txt2img-ddim-numpy-fp32"
    for name in ("report.html", "summary.json", "details.json.gz", "junit.xml", "repro.sh"):
        assert (case / name).is_file(), name
    runs = {p.name for p in (case / "runs").iterdir()}
    assert runs == {"reference.h5", "oracle.h5", "block_oracle.h5", "candidate.h5", "isolated.h5"}
    summary = load_summary(case / "summary.json")
    assert summary["runs"]["candidate"]["path"] == str(case / "runs" / "candidate.h5")
    assert (case / "summary.json").stat().st_size < 1_000_000
    fault = load_summary(next((work / "reports" / "fault").glob("*/summary.json")))
    assert [c["block"] for c in fault["culprits"]][:1] == ["unet_block_1_down"]
    for name in ("out.png", "again.png", "filled.png", "tiny-sd1.ckpt", "names.toml", "cand.json"):
        assert (work / name).is_file(), name
    assert (work / "my-model" / "unet").is_dir() and (work / "in" / "run.json").is_file()

    # the case's repro.sh, run from elsewhere, reproduces its verdict (into rerun/, or the folder given)
    script = (case / "repro.sh").read_text()
    assert "--output-dir" in script and "DIR" not in script.replace("--output-dir", "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = subprocess.run(["sh", str(case / "repro.sh"), str(tmp_path / "again")], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = load_summary(tmp_path / "again" / case.name / "summary.json")
    assert rerun["verdict"] == summary["verdict"] and rerun["coverage"]["counts"] == summary["coverage"]["counts"]
    assert not any(elsewhere.iterdir())


@pytest.mark.parametrize("section", ["Check your port", "Everyday use"])
def test_readme_sections_use_the_current_vocabulary(section):
    text = README[README.index(f"## {section}"):]
    text = text[:text.index("\n## ", 4)]
    assert not re.search(r"--impl\b|--backend\b|--out\b|-o\s", text)
