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
