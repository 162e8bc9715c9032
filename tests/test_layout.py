"""The package keeps the shape docs/architecture.md describes: short modules, imports at the top (the layer rule of
``lint-imports`` sees every import), and what a press can do asked of the press contract, never probed."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvpress_ext"
MODULES = sorted(PACKAGE.rglob("*.py"))
#: the most lines a module may have: past it, a module holds more than one concept
MAX_LINES = 500
#: a press's capability read by a literal attribute name (``hasattr(press, "reset")``): the probing the contract
#: replaces (reading a press's declared parameters by their field names is not probing)
PROBE = re.compile(r"""\b(hasattr|getattr)\((self\.)?(press|inner|base|wrapped)\w*, *["']""")


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_the_package_has_modules_to_check():
    assert len(MODULES) > 50 and PACKAGE / "core" / "contract.py" in MODULES


def test_no_module_is_longer_than_the_limit():
    long = {_relative(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (at most {MAX_LINES} lines each): {long}"


def _imports_inside_functions(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines += [sub.lineno for sub in ast.walk(node)
                      if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("kvpress_ext")
                      or isinstance(sub, ast.Import) and any(a.name.startswith("kvpress_ext") for a in sub.names)]
    return sorted(set(lines))


def test_package_modules_import_each_other_at_the_top_only():
    """An import of kvpress_ext placed inside a function hides a dependency from the layer check (and used to
    dodge cycles); the moved-module aliases are the one exception (they import on demand by design)."""
    found = {_relative(p): lines for p in MODULES if p.name != "moved_modules.py"
             and (lines := _imports_inside_functions(ast.parse(p.read_text())))}
    assert found == {}, f"move these imports to the top of their module: {found}"


def test_the_inside_function_check_sees_such_an_import():
    source = "import os\n\ndef f():\n    from kvpress_ext.core import registry\n    return registry\n"
    assert _imports_inside_functions(ast.parse(source)) == [4]


def test_presses_are_asked_through_the_contract_not_probed():
    found = [f"{_relative(p)}:{i}" for p in MODULES if p.name != "contract.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if PROBE.search(line)]
    assert found == [], f"ask kvpress_ext.core.contract instead of probing the press: {found}"


def test_the_probe_pattern_matches_capability_probing():
    assert PROBE.search('if hasattr(press, "after_forward"):') and PROBE.search('getattr(self.press, "reset", None)')
    assert not PROBE.search("getattr(owner, name, None)") and not PROBE.search("getattr(press, f.name, None)")
