"""impl/ is a clean-room implementation: it never imports the reference libraries or the harness.

Every import statement under impl/ (top level or nested in functions, `import x`, `from x import y`,
and `importlib.import_module("x")` / `__import__("x")` with a literal name) is checked.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

IMPL = Path(__file__).resolve().parent.parent / "impl"
FORBIDDEN = ("diffusers", "transformers", "reference", "parity")
OWN_PACKAGE = "sd_parity.impl"  # impl/'s installed name; the rest of sd_parity is the harness


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append((node.lineno, node.module))
            elif node.level > 0:
                # a relative import must stay inside impl/
                package = path.parent
                for _ in range(node.level - 1):
                    package = package.parent
                if IMPL not in (package, *package.parents):
                    found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _forbidden(module: str) -> bool:
    """A reference library, the harness (under any name), or a relative import leaving impl/."""
    top = module.split(".", 1)[0]
    harness = top == "sd_parity" and module != OWN_PACKAGE and not module.startswith(OWN_PACKAGE + ".")
    return top in FORBIDDEN or harness or module.startswith(".")


def _violations(path: Path) -> list[str]:
    return [f"{path.relative_to(IMPL.parent)}:{line}: imports {module}"
            for line, module in _imported_modules(path) if _forbidden(module)]


def test_impl_imports_no_reference_library_or_harness():
    files = sorted(IMPL.rglob("*.py"))
    assert files, "impl/ has no Python files"
    violations = [v for f in files for v in _violations(f)]
    assert not violations, "impl/ must stay clean-room:\n" + "\n".join(violations)


@pytest.mark.parametrize("source, expected", [
    ("import diffusers", ["diffusers"]),
    ("from transformers.models import clip", ["transformers.models"]),
    ("def f():\n    import parity.naming", ["parity.naming"]),
    ("import importlib\nimportlib.import_module('reference.runner')", ["importlib", "reference.runner"]),
    ("from impl.ops import get_ops\nimport numpy", ["impl.ops", "numpy"]),
    ("from sd_parity.runs import hdf5", ["sd_parity.runs"]),
])
def test_scanner_sees_every_import_form(tmp_path, source, expected):
    module = tmp_path / "probe.py"
    module.write_text(source)
    assert [name for _, name in _imported_modules(module)] == expected



@pytest.mark.parametrize("module, forbidden", [
    ("sd_parity.judging.compare", True), ("sd_parity", True), ("sd_parity.impl.ops", False),
    ("sd_parity.implx", True), ("numpy", False), ("..parity", True), ("parity.naming", True),
])
def test_installed_names_of_the_harness_are_forbidden(module, forbidden):
    assert _forbidden(module) is forbidden
