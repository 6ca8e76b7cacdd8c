"""The README's Python example runs as written (docs that drift are worse than none)."""
import contextlib
import io
import os
import re
from pathlib import Path

from sd_parity.fixtures import ensure_fixture

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(monkeypatch):
    ensure_fixture("tiny-sd1")
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(ROOT)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "README.md", "exec"), {})
    printed = output.getvalue()
    assert "numpy (1, 64, 64, 3)" in printed and "torch (1, 64, 64, 3)" in printed
    assert "\ndown_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q (2, " in printed
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_readme_capture_and_compare_flow_ends_at_parity(tmp_path, monkeypatch):
    """The README's own capture -> compare example, as written (paths moved into a temporary folder):
    clean code must come out at parity, exit 0."""
    import shlex

    from sd_parity.cli import main

    lines = [line.strip()[3:] for line in (ROOT / "README.md").read_text().splitlines()
             if line.strip().startswith(("$P capture", "$P compare")) and "port.h5" not in line]  # the user's own port
    assert [line.split()[0] for line in lines] == ["capture", "capture", "compare"]
    monkeypatch.chdir(tmp_path)
    for line in lines:
        args = [arg.replace("/tmp/", f"{tmp_path}/") for arg in shlex.split(line.split("#")[0])]
        assert main(args) == 0, line
