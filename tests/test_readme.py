"""README.md is true: its set-up block installs, in a fresh virtual environment, what the tests need at the pinned
versions; every command and Python block runs as written from a fresh copy of the repository with ``../shared``
beside it (with smaller sizes), prints what the README says, without noise, and leaves ``git status`` clean; its
excerpts of program output and example files are what the code gives now (docs/build_readme_excerpts.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: Blocks that are run; ``text`` blocks show output, ``toml`` blocks are excerpts of files (checked below).
RUN, SHOWN = ("bash", "python"), ("text", "toml")
#: Marker comments of the blocks ``.ci/run`` runs: the set-up (run here in a fresh virtual environment by
#: :func:`test_readme_setup_installs_the_pins_and_the_tests_collect`) and the test command.
SETUP, TESTS = "ci: setup", "ci: tests"
#: Smaller sizes for the test, each of which must match the README (so a README change cannot make the test slow).
SMALLER = [
    ("--max_eval_tokens 2048", "--max_eval_tokens 600"),
    ("--max_new_tokens 2000", "--max_new_tokens 120"),
    ("max_new_tokens=1000,", "max_new_tokens=560,"),
    ("min_new_tokens=1000,", "min_new_tokens=560,"),
    ("max_new_tokens=200)", "max_new_tokens=40)"),
    # The test suite itself: collected (every test module imports), not run again from inside a test.
    ("python -m pytest -q", "python -m pytest -q --collect-only"),
]
#: Never printed: tracebacks, transformers' reminder about max_length, and its per-tensor "Loading weights" bar (our
#: commands, ``load_model`` and ``pipeline(..., model=PATH)`` all hide it).
NOISE = ("Traceback", "predefined maximum length", "no compression applied", "Loading weights")

_BLOCK = re.compile(r"^(?:<!-- (?P<marker>[^>]*) -->\n)?```(?P<lang>\w*)\n(?P<body>(?:(?!```).*\n)*)```", re.MULTILINE)


def readme_blocks() -> list[dict]:
    """Every fenced block of README.md: its section, language, body and the marker comment above it."""
    text = README.read_text()
    blocks = []
    for match in _BLOCK.finditer(text):
        sections = re.findall(r"^## (.+)$", text[: match.start()], re.MULTILINE)
        blocks.append({"section": sections[-1] if sections else "", "lang": match.group("lang"),
                       "body": match.group("body"), "marker": match.group("marker") or ""})
    return blocks


def jobs() -> list[tuple[str, str, str]]:
    """(id, language, code) to run: each bash block alone, the Python blocks of a section as one script (later
    blocks continue the earlier ones); the small sizes of :data:`SMALLER` substituted."""
    out, python = [], {}
    for i, block in enumerate(readme_blocks()):
        if block["lang"] not in RUN or block["marker"].startswith(SETUP) or "excerpt:" in block["marker"]:
            continue
        if block["lang"] == "python":
            python.setdefault(block["section"], []).append(block["body"])
        else:
            out.append((f"bash-{i}-{block['section'].split()[0].lower()}", "bash", block["body"]))
    out += [(f"python-{section.split()[0].lower()}", "python", "\n".join(bodies)) for section, bodies in python.items()]
    return [(name, lang, _smaller(code)) for name, lang, code in out]


def _smaller(code: str) -> str:
    for big, small in SMALLER:
        code = code.replace(big, small)
    return code


def test_readme_blocks_are_runnable_output_or_excerpts():
    blocks = readme_blocks()
    assert blocks, "no code blocks found in README.md"
    for block in blocks:
        assert block["lang"] in RUN + SHOWN, f"block without a known language ({block['lang']!r}): {block['body'][:80]}"
        if block["lang"] == "toml":
            assert "excerpt:" in block["marker"], "toml blocks are excerpts of files"
    setup = [b for b in blocks if b["marker"].startswith(SETUP)]
    tests = [b for b in blocks if b["marker"].startswith(TESTS)]
    assert len(setup) == 1 and len(tests) == 1, "one set-up block and one test block, each marked for .ci/run"
    commands = [line for line in setup[0]["body"].splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].startswith("python3 -m venv"), "set-up: two commands, a venv first"
    assert commands[1].count("-c constraints.txt") == commands[1].count("pip install"), "every install is pinned"
    assert ".[dev,distributed]" in commands[1], "the extras the tests need"
    assert tests[0]["body"].strip() == "python -m pytest -q"
    text = README.read_text()
    for big, _small in SMALLER:
        assert big in text, f"README.md no longer has {big!r}: update SMALLER in tests/test_readme.py"


def _copy_repository(root: Path) -> Path:
    """The repository's files (tracked and new, not ignored) copied to <root>/kvpress-ext and committed there as a
    new git repository (so ``git status`` shows what a command left behind), <root>/shared beside it."""
    shared = shared_path()
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=False)
    files = [f for f in listed.stdout.split("\0") if f] if listed.returncode == 0 else None
    copy = root / "kvpress-ext"
    if files is None:  # not a git checkout: everything but caches and results
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", ".*_cache"))
    else:
        for name in files:
            if (REPO / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, copy / name)
    (root / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    git = ["git", "-c", "user.name=readme-test", "-c", "user.email=readme-test@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A", "-f"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + args, cwd=copy, check=True, capture_output=True)
    return copy


#: Names of the jobs run in the module's fresh copy.
_RAN: set[str] = set()


def _untracked_or_changed(copy: Path) -> list[str]:
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=copy, check=True,
                            capture_output=True, text=True).stdout
    return status.splitlines()


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    _RAN.clear()
    return _copy_repository(tmp_path_factory.mktemp("clone"))


def _run(copy: Path, lang: str, code: str) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(copy),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("KVPRESS_EXT_SHARED", None)  # the README says ../shared
    if lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        script = copy.parent / "readme_block.py"  # outside the copy: it is not an output of the README
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    return subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("name, lang, code", jobs(), ids=[j[0] for j in jobs()])
def test_readme_block_runs_as_written(name, lang, code, fresh_copy):
    assert shutil.which("kvpress-ext", path=str(Path(sys.executable).parent)), "install the package: pip install -e ."
    run = _run(fresh_copy, lang, code)
    _RAN.add(name)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{name} failed:\n{code}\n--- output ---\n{output[-4000:]}"
    for noise in NOISE:
        assert noise not in output, f"{name} printed {noise!r}:\n{output[-3000:]}"
    if "evaluation/perplexity.py" in code and "--executor ray" in code:  # a sweep: a line per cell, the summary
        assert re.search(r"^no_press +\| uncompressed", run.stdout, re.MULTILINE), run.stdout
        assert len(re.findall(r"^knorm +\|", run.stdout, re.MULTILINE)) == 3, run.stdout  # a line per knorm cell
        assert "wrote results/sweep/summary.md" in run.stdout, run.stdout
        if "--summarize" in code:  # it prints the table it rebuilt: a row per knorm cell
            assert run.stdout.count("| knorm |") == 3, run.stdout
    elif "evaluation/perplexity.py" in code:  # the main job: the baseline beside the press, what it kept, units
        assert re.search(r"^no_press \(baseline\) +uncompressed", run.stdout, re.MULTILINE), run.stdout
        assert re.search(r"^lazy_streaming +cap_total=256, slack=32 .* MiB \(\d+ %\) .* tok/s .* ms", run.stdout,
                         re.MULTILINE), run.stdout
        assert "None" not in run.stdout and "JSON in results/perplexity" in run.stdout
        sample = next(b["body"] for b in readme_blocks() if b["lang"] == "text" and "no_press (baseline)" in b["body"])
        runs = re.compile(r"median of (\d+) runs?")
        assert runs.search(sample).group(1) == runs.search(run.stdout).group(1), "README sample: the timed runs"
    if lang == "python" and "pipeline(" in code:  # the quickstart: compression visibly happens, generate is bounded
        context, kept = map(int, re.search(r"(\d+) context tokens, (\d+) kept in the KV cache", run.stdout).groups())
        assert 0 < kept < context, run.stdout
        held = int(re.search(r": (\d+) cache entries \(cap_total 128\)", run.stdout).group(1))
        assert held <= 128, run.stdout
    if "a3 ask" in code:
        assert re.search(r"recomputed \d+/\d+ document tokens", run.stdout) and (fresh_copy / "results/a3/ask.json").is_file()
    if "icl precompute" in code:
        assert (fresh_copy / "results/icl/cache/metadata.json").is_file(), output


@pytest.mark.slow
def test_readme_blocks_leave_git_status_clean(fresh_copy):
    """Every output of the README's commands lands under results/ (or a temporary folder) and is ignored by git."""
    for name, lang, code in jobs():
        if name not in _RAN:  # run on its own, this test runs the blocks itself
            run = _run(fresh_copy, lang, code)
            assert run.returncode == 0, f"{name} failed:\n{(run.stdout + run.stderr)[-3000:]}"
    assert _untracked_or_changed(fresh_copy) == [], "README commands left files that git sees (write under results/)"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[name.strip()] = version.strip()
    return pins


def _offline_pip() -> dict[str, str]:
    """pip settings that never reach the network: the package indexes on this machine's disk that pip is configured
    with (CI's machines have them), which also give pip the build tools for an isolated build of our two projects;
    with none, no index and no build isolation (the borrowed setuptools, which needs ``wheel``, builds them)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False).stdout
    urls = [url for line in listed.splitlines() if re.match(r"^[\w:.]+\.(extra-)?index-url=", line)
            for url in line.split("=", 1)[1].strip("'\"").split()]
    local = [url for url in urls if url.startswith("file://") and Path(url.removeprefix("file://")).is_dir()]
    if not local:
        return {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_FIND_LINKS": ""}
    return {"PIP_INDEX_URL": local[0], "PIP_EXTRA_INDEX_URL": " ".join(local[1:]), "PIP_FIND_LINKS": ""}


#: Our distributions (kvpress-ext and the example plugin), hidden from the set-up test's borrowed packages: the
#: README's commands must resolve them from the fresh copy alone, as on a clean machine (pip 23 could not resolve the
#: plugin's dependency on kvpress-ext when both were named in one install with extras; CI caught it, this did not).
OURS = ("kvpress_ext",)


@pytest.mark.slow
def test_readme_setup_installs_the_pins_and_the_tests_collect(tmp_path):
    """The README's two set-up commands, run as written in a fresh copy, give a virtual environment with every pin
    of constraints.txt, the package from that copy, the example plugin and the default model's package; the README
    test command then collects every test module (nothing missing, e.g. ray for the sweep tests) and git status
    stays clean. Offline and in minutes: the new environment sees this one's installed packages through a path
    file (what ``--system-site-packages`` does for a system Python) with our own distributions left out, and pip may
    not reach any index, so a pin this environment does not satisfy fails the install."""
    copy = _copy_repository(tmp_path)
    setup = next(b["body"] for b in readme_blocks() if b["marker"].startswith(SETUP))
    tests = next(b["body"] for b in readme_blocks() if b["marker"].startswith(TESTS))
    subprocess.run([sys.executable, "-m", "venv", str(copy / ".venv")], check=True, capture_output=True)
    here = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    outer = tmp_path / "outer-site-packages"  # this environment's packages less ours, which the set-up must install
    outer.mkdir()
    for entry in here.iterdir():
        if not entry.name.lower().lstrip("_").removeprefix("editable__.").removeprefix("editable___").startswith(OURS):
            (outer / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (next((copy / ".venv" / "lib").glob("python3*")) / "site-packages" / "outer.pth").write_text(f"{outer}\n")
    env = {**os.environ, **_offline_pip(), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    outside = [p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)]  # not this venv
    env["PATH"] = os.pathsep.join([str(Path(sys._base_executable).parent), *outside])  # python3: the same Python
    pins = _constraints()
    check = ("import importlib.metadata as m, json, kvpress_ext, kvpress_ext_example; "
             f"print(json.dumps({{'file': kvpress_ext.__file__, 'versions': {{n: m.version(n) for n in {sorted(pins)!r}}}}}))")
    script = f"set -euo pipefail\n{setup}\npython -c {shlex.quote(check)}\n{_smaller(tests)}\n"
    run = subprocess.run(["bash", "-c", script], cwd=copy, env=env, capture_output=True, text=True, timeout=1500,
                         check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"README set-up or test command failed:\n{output[-4000:]}"
    found = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    assert Path(found["file"]).resolve().is_relative_to(copy.resolve()), found["file"]
    for name, version in pins.items():
        assert found["versions"][name].split("+")[0] == version, (name, found["versions"][name], version)
    assert re.search(r"^\d+ tests collected", run.stdout, re.MULTILINE) and " error" not in run.stdout, output[-3000:]
    assert _untracked_or_changed(copy) == [], "the set-up left files that git sees"


def _excerpts_module():
    spec = importlib.util.spec_from_file_location("build_readme_excerpts", REPO / "docs" / "build_readme_excerpts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_excerpts_match_the_code():
    module = _excerpts_module()
    text = README.read_text()
    assert text.count("<!-- excerpt: ") == len(module.EXCERPTS), "every excerpt the builder knows is in README.md"
    assert module.build(text) == text, "README.md excerpts are stale: run `python docs/build_readme_excerpts.py`"


def test_excerpt_builder_replaces_a_stale_block():
    """The check can fail: a stale list excerpt is rewritten, and the rewrite is what `kvpress-ext list` prints."""
    module = _excerpts_module()
    stale = "x\n<!-- excerpt: kvpress-ext list -->\n```text\nPresses (48):\n  old line\n```\ny\n"
    rebuilt = module.build(stale)
    assert rebuilt != stale and "old line" not in rebuilt and rebuilt.startswith("x\n") and rebuilt.endswith("```\ny\n")
    listing = module._list_output()
    for line in rebuilt.splitlines()[3:-2]:
        assert line == "  ..." or line in listing.splitlines(), line
