"""Rebuild the README's excerpts of program output and of example files from the code, so they cannot go stale.

    python docs/build_readme_excerpts.py           # rewrite README.md in place
    python docs/build_readme_excerpts.py --check   # exit 1 if README.md is out of date

An excerpt is the fenced block right after a marker line ``<!-- excerpt: NAME -->`` in README.md; NAME is a key of
:data:`EXCERPTS`, whose function returns the block's new content. tests/test_readme.py checks that README.md equals
``build(README.md)``.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: Presses shown in the ``kvpress-ext list`` excerpt (the methods this project adds, two of kvpress's, the plugin's).
LISTED_PRESSES = ("a3", "knorm", "lazy_streaming", "rkv", "snapkv", "value_norm")
LISTED_ADAPTERS = 2


def _list_output() -> str:
    from kvpress_ext.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["list"])
    return out.getvalue()


def list_excerpt() -> str:
    """``kvpress-ext list``: its header, the entries of :data:`LISTED_PRESSES` (each with its wrapped lines) and the
    first adapters, ``...`` where lines are left out."""
    from kvpress_ext.core.registry import available_presses

    missing = [n for n in LISTED_PRESSES if n not in available_presses()]
    if missing:
        raise SystemExit(f"presses {missing} are not registered; install the example plugin first "
                         "(pip install --no-build-isolation examples/plugin_example, as .ci/run does)")
    lines = _list_output().splitlines()
    keep, current, adapters = [], None, 0
    section = "presses"
    for line in lines:
        if line.startswith("Presses ("):
            keep.append(line)
            continue
        if line.startswith("Model adapters ("):
            keep += ["  ...", line]
            section = "adapters"
            continue
        if section == "presses":
            match = re.match(r"^  (\S+)", line)
            if match:
                current = match.group(1)
            if current in LISTED_PRESSES and line.strip():
                keep.append(line)
        elif section == "adapters" and line.startswith("  "):
            adapters += 1
            if adapters <= LISTED_ADAPTERS:
                keep.append(line)
        elif section == "adapters" and not line.strip() and adapters:
            section = "done"
    if adapters > LISTED_ADAPTERS:
        keep.append("  ...")
    return "\n".join(keep)


def plugin_pyproject_excerpt() -> str:
    """The entry-point table of the example plugin's pyproject.toml (its whole contract with kvpress-ext)."""
    text = (REPO / "examples" / "plugin_example" / "pyproject.toml").read_text()
    match = re.search(r"^\[project\.entry-points\.kvpress_ext\]\n(?:[^\n\[]+\n)*", text, re.MULTILINE)
    return "# pyproject.toml\n" + match.group(0).rstrip()


def plugin_module_excerpt() -> str:
    """The example plugin's module, without its module docstring."""
    text = (REPO / "examples" / "plugin_example" / "kvpress_ext_example" / "plugin.py").read_text()
    text = re.sub(r'^"""[^"]*"""\n\n', "", text)
    return "# kvpress_ext_example/plugin.py\n" + text.rstrip()


EXCERPTS = {
    "kvpress-ext list": list_excerpt,
    "plugin pyproject": plugin_pyproject_excerpt,
    "plugin module": plugin_module_excerpt,
}

#: A marker line, the opening fence, the body (lines that do not start a fence; may be none), the closing fence.
_MARKED_BLOCK = re.compile(r"(<!-- excerpt: (?P<name>[^>]+?) -->\n```(?P<lang>\w*)\n)(?P<body>(?:(?!```).*\n)*)(```)")


def build(readme: str) -> str:
    """``readme`` with every marked excerpt replaced by what the code gives now."""
    names = [m.group("name") for m in _MARKED_BLOCK.finditer(readme)]
    unknown = sorted(set(names) - set(EXCERPTS))
    if unknown:
        raise SystemExit(f"README.md names unknown excerpts {unknown}; known: {sorted(EXCERPTS)}")
    return _MARKED_BLOCK.sub(lambda m: m.group(1) + EXCERPTS[m.group("name")]() + "\n" + m.group(5), readme)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    current = README.read_text()
    new = build(current)
    if "--check" in argv:
        if new != current:
            print("README.md excerpts are out of date: run `python docs/build_readme_excerpts.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
