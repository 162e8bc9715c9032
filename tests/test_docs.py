"""The generated results document is in sync with its parts (docs/build_results.py)."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_results_md_is_built_from_its_parts():
    spec = importlib.util.spec_from_file_location("build_results", DOCS / "build_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "results.md").read_text() == module.build(), "run `python docs/build_results.py`"
    for line in (DOCS / "results.md").read_text().splitlines():  # every linked plot exists
        if line.startswith("![") and "](" in line:
            assert (DOCS / line.split("](")[1].rstrip(")")).exists(), line
