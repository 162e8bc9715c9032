"""examples/quickstart.py runs end to end and shows what it claims (bounded streaming cache, every method)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # both run the example script in a subprocess

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_every_method():
    # stories260k: seconds, 2,000 tokens far past its 512-token context
    run = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--model", "stories260k",
                          "--stream_tokens", "2000"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    for noise in ("Loading weights", "predefined maximum length", "Traceback"):  # quiet: the example is the output
        assert noise not in run.stdout + run.stderr, noise
    out = run.stdout
    for label in ("snapkv 0.5:", "rkv budget 32:", "a3 debug 0.3:", "full prefill:"):
        assert label in out, out
    m = re.search(r"lazy_streaming: generated (\d+) tokens; cache holds (\d+) \(cap_total (\d+)\)", out)
    assert m, out
    generated, held, cap = map(int, m.groups())
    assert generated == 2000 and held <= cap == 128


def test_quickstart_runs_on_the_default_model(smollm2):  # the fixture converts the model once (or skips off CI)
    run = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--stream_tokens", "150"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    m = re.search(r"lazy_streaming: generated (\d+) tokens; cache holds (\d+) \(cap_total (\d+)\)", run.stdout)
    assert m, run.stdout
    generated, held, cap = map(int, m.groups())
    assert generated == 150 and held <= cap == 128  # 150 > cap + slack (144): it compacted at least once
    answers = dict(line.split(": ", 1) for line in run.stdout.splitlines() if line.startswith(("snapkv", "rkv")))
    assert all(a.strip() for a in answers.values()) and len(answers) == 2, run.stdout  # the chat model answers
