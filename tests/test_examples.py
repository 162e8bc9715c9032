"""examples/quickstart.py runs end to end and shows what it claims (bounded streaming cache, every method)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_every_method(smollm2):  # the default model, converted once by the fixture
    run = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--stream_tokens", "300"],
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
    assert generated == 300 and held <= cap == 128 < generated
