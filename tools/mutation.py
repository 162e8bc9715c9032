"""Mutation testing of the core modules, one module at a time (mutmut 3 underneath).

Why: a green suite only says the tests pass, not that they would fail on a bug. mutmut plants small
bugs ("mutants": ``<`` -> ``<=``, ``+ 1`` -> ``+ 2``, a dropped argument, ...) one at a time in a
module and runs the tests that reach the mutated function; a mutant that no test fails on
("survived") marks a behaviour nobody checks.

Usage (from the repository root, in the project's venv; see docs/testing.md)::

    python tools/mutation.py --list                  # modules, their source files and test files
    python tools/mutation.py --module rope           # fresh run; prints the score and the survivors' diffs
    python tools/mutation.py --module rope --survivors   # rerun only the last run's survivors (after adding tests)
    python tools/mutation.py --module rope --report      # the last run's score and survivors again
    python tools/mutation.py --module rope --mark-equivalent NAME --reason "why it cannot change behaviour"

Each module runs in its own scratch copy (``.mutation/<module>/``, ignored by git) with a
``[tool.mutmut]`` section that mutates only that module's files and selects only its test files, so
a run takes minutes. Mutants listed in ``tools/mutation_equivalent.json`` (cannot change behaviour,
each with its reason and the mutated text, checked on every run) are left out of the score:
``score = killed / (all - equivalent)``, where timeouts count as killed and "no tests" as survived.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".mutation"
EQUIVALENT = REPO / "tools" / "mutation_equivalent.json"

# module -> (files to mutate, test files that exercise them). mutmut maps each mutated function to the
# tests (of these files) that call it, so a mutant only runs the tests that can see it. A test file may be
# narrowed to some of its tests with pytest node ids ("tests/test_x.py::test_name") to leave out slow ones.
def _tests_of(path: str, but: tuple[str, ...]) -> list[str]:
    """Node ids of the test functions of ``path`` except those named in ``but`` (slow ones: a mutant that survives
    runs every test mapped to it)."""
    names = re.findall(r"^def (test_\w+)", (REPO / path).read_text(), flags=re.MULTILINE)
    return [f"{path}::{name}" for name in names if name not in but]


# test_batches.py without its SmolLM2 tests, test_perplexity.py without its command-line test (a subprocess, ~50 s)
_FAST_BATCH_TESTS = _tests_of("tests/test_batches.py", but=("test_smollm2_padded_batch_answers_as_each_sequence_alone",))
_FAST_PERPLEXITY_TESTS = _tests_of("tests/test_perplexity.py", but=("test_command_line_json_and_errors",))

MODULES: dict[str, tuple[list[str], list[str]]] = {
    "rope": (["kvpress_ext/core/rope.py"],
             ["tests/test_rope.py", "tests/test_adapters_rope.py", "tests/test_rkv.py", "tests/test_a3.py"]),
    "positions": (["kvpress_ext/core/positions.py"],
                  ["tests/test_positions.py", "tests/test_lazy_streaming.py", "tests/test_rkv.py",
                   "tests/test_cache_io.py", "tests/test_pipeline_presses.py", "tests/test_gemma3.py",
                   *_FAST_BATCH_TESTS]),
    # every test that runs a press reaches apply_press: only the fast ones that check these two modules
    "contract": (["kvpress_ext/core/contract.py", "kvpress_ext/core/apply.py"],
                 ["tests/test_contract.py", "tests/test_apply_press.py", "tests/test_temporal_order.py",
                  "tests/test_registry.py", "tests/test_perplexity_units.py",
                  # apply.py's padded-batch refusals and Gemma 3's sliding layers following moved positions
                  "tests/test_gemma3.py", "tests/test_positions.py", "tests/test_chunked_prefill.py",
                  *_FAST_BATCH_TESTS]),
    "a3_selection": (["kvpress_ext/presses/a3/selection.py"], ["tests/test_a3.py"]),
    "lazy_streaming": (["kvpress_ext/presses/lazy_streaming.py"],
                       ["tests/test_lazy_streaming.py", "tests/test_pipeline_presses.py"]),
    "a3_store": (["kvpress_ext/storage/chunk_store.py", "kvpress_ext/presses/a3/chunk_store.py",
                  "kvpress_ext/storage/chunk_files.py"],
                 ["tests/test_a3.py", "tests/test_a3_cli.py", "tests/test_data_safety.py", "tests/test_concurrency.py",
                  "tests/test_a3_chunk_store.py", "tests/test_a3_chunk_files.py"]),
    "a3_attention": (["kvpress_ext/presses/a3/attention.py"], ["tests/test_a3.py", "tests/test_a3_attention.py"]),
    "a3_fusion": (["kvpress_ext/presses/a3/fusion.py", "kvpress_ext/presses/a3/press.py",
                   "kvpress_ext/presses/a3/evict.py"],
                  ["tests/test_a3.py", "tests/test_a3_cli.py", "tests/test_a3_fusion.py"]),
    "rkv": (["kvpress_ext/presses/rkv.py"], ["tests/test_rkv.py", "tests/test_rkv_scoring.py", "tests/test_rkv_decoding.py"]),
    "cache_io": (["kvpress_ext/storage/cache_files.py"],
                 ["tests/test_cache_io.py", "tests/test_cache_files_checks.py", "tests/test_data_safety.py"]),
    "adapters": (["kvpress_ext/core/adapters/__init__.py", "kvpress_ext/core/adapters/base.py",
                  "kvpress_ext/core/adapters/gpt_neox.py", "kvpress_ext/core/adapters/llama.py"],
                 ["tests/test_adapters_rope.py", "tests/test_adapters_contract.py", "tests/test_neox_press_inputs.py",
                  "tests/test_rkv.py", "tests/test_lazy_streaming.py", "tests/test_plugins.py"]),
    "perplexity": (["kvpress_ext/evaluation/perplexity.py"], ["tests/test_perplexity_units.py", "tests/test_perplexity.py"]),
    "icl_scoring": (["kvpress_ext/icl/answers.py", "kvpress_ext/icl/scoring.py"], ["tests/test_icl_scoring.py", "tests/test_icl_scoring_edges.py"]),
    "registry": (["kvpress_ext/core/registry.py"], ["tests/test_registry.py", "tests/test_plugins.py"]),
    "registration": (["kvpress_ext/core/tables.py"],
                     ["tests/test_registration_tables.py", "tests/test_registry.py", "tests/test_plugins.py"]),
    "plugins": (["kvpress_ext/plugins/loader.py"], ["tests/test_plugins.py"]),
    "batch": (["kvpress_ext/core/batch.py"], [*_FAST_BATCH_TESTS, "tests/test_lazy_streaming.py", "tests/test_rkv.py"]),
    "chunked_prefill": (["kvpress_ext/core/chunked_prefill.py"],
                        ["tests/test_chunked_prefill.py", "tests/test_temporal_order.py", "tests/test_perplexity_units.py",
                         "tests/test_contract.py",
                         "tests/test_lazy_streaming.py", *_FAST_BATCH_TESTS,
                         *_FAST_PERPLEXITY_TESTS]),
    "gemma3_adapter": (["kvpress_ext/core/adapters/gemma3.py"],
                       ["tests/test_gemma3.py", "tests/test_adapters_contract.py", "tests/test_adapters_rope.py"]),
    "devices": (["kvpress_ext/core/devices.py"], ["tests/test_devices.py", "tests/test_offload.py::test_placement_flags_parse"]),
    "tokens": (["kvpress_ext/core/tokens.py"], ["tests/test_tokens.py"]),
    "kvpress_table": (["kvpress_ext/core/kvpress_table.py"], ["tests/test_registry.py", "tests/test_registration_tables.py"]),
    "temporal_order": (["kvpress_ext/core/temporal_order.py"],
                       ["tests/test_temporal_order.py", "tests/test_registry.py"]),
}

# copied beside the package: tests run the scripts under evaluation/ and examples/ as subprocesses, and
# test_data_safety.py checks that a tracked file under docs/ is left untouched
COPIED = ["evaluation", "examples", "docs"]
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def _config(files: list[str], tests: list[str]) -> str:
    def arr(xs):
        return "[" + ", ".join(json.dumps(x) for x in xs) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["kvpress_ext"]\n'
        f"only_mutate = {arr(files)}\n"
        f"pytest_add_cli_args_test_selection = {arr(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore"]\n'
        f"also_copy = {arr(COPIED)}\n"
        "use_git_change_detection = false\n"
    )


def _prepare(module: str, fresh: bool) -> Path:
    """Scratch copy of the package, the tests and pyproject.toml (with this module's mutmut section)."""
    files, tests = MODULES[module]
    tests = [t for t in tests if (REPO / t.split("::")[0]).exists()]
    work = WORK / module
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("kvpress_ext", "tests", *COPIED):
        if (work / name).exists():
            shutil.rmtree(work / name)
        shutil.copytree(REPO / name, work / name, ignore=ignore)
        # the scratch copy under mutants/ must see the current tests too (mutmut copies them only once)
        if name != "kvpress_ext" and (work / "mutants" / name).exists():
            shutil.rmtree(work / "mutants" / name)
            shutil.copytree(REPO / name, work / "mutants" / name, ignore=ignore)
    pyproject = (REPO / "pyproject.toml").read_text()
    pyproject = re.sub(r"\n\[tool\.mutmut\].*?(?=\n\[|\Z)", "", pyproject, flags=re.DOTALL)
    (work / "pyproject.toml").write_text(pyproject + _config(files, tests))
    return work


def _env(work: Path) -> dict:
    env = dict(os.environ)
    # scripts the tests start (evaluation/*.py) import this branch's package (unmutated: mutmut maps only
    # in-process calls to tests, and putting mutants/ here breaks that mapping); pytest itself gets mutants/ first
    env["PYTHONPATH"] = str(work)
    env.setdefault("KVPRESS_EXT_SHARED", str(REPO.parent / "shared"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PY_COLORS"] = "0"
    return env


def _mutmut(work: Path, *args: str, log=None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe) if exe.exists() else "mutmut", *args]
    return subprocess.run(cmd, check=False, cwd=work, env=_env(work), text=True, stdout=log or subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def _statuses(work: Path, files: list[str]) -> dict[str, str]:
    sys.path.insert(0, str(Path(sys.executable).parent))
    from mutmut.stats import status_by_exit_code

    out = {}
    for f in files:
        meta = work / "mutants" / (f + ".meta")
        if not meta.exists():
            continue
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[key] = status_by_exit_code[code]
    return out


def _restore_unchecked(work: Path, files: list[str], previous: dict[str, int | None]) -> None:
    """After a survivors-only rerun: mutants mutmut reset but did not rerun keep their previous verdict
    (mutmut resets every verdict when the test selection changes; a kill stays a kill when tests are added)."""
    for f in files:
        meta_path = work / "mutants" / (f + ".meta")
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        codes = meta["exit_code_by_key"]
        for key, code in codes.items():
            if code is None and previous.get(key) is not None:
                codes[key] = previous[key]
        meta_path.write_text(json.dumps(meta, indent=4))


def _exit_codes(work: Path, files: list[str]) -> dict[str, int | None]:
    out = {}
    for f in files:
        meta = work / "mutants" / (f + ".meta")
        if meta.exists():
            out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def _show(work: Path, name: str) -> str:
    return _mutmut(work, "show", name).stdout


def _diff_lines(diff: str) -> str:
    """The changed lines of a mutant's diff (what an equivalence entry pins)."""
    keep = [ln for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return "\n".join(ln.rstrip() for ln in keep)


def _load_equivalent() -> dict:
    return json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}


def report(module: str, work: Path, elapsed: float | None) -> dict:
    files, _ = MODULES[module]
    statuses = _statuses(work, files)
    equivalent = _load_equivalent()
    eq_ok, stale = {}, []
    for name, entry in equivalent.items():
        if name in statuses and statuses[name] not in KILLED:
            if _diff_lines(_show(work, name)) == entry["diff"]:
                eq_ok[name] = entry["reason"]
            else:
                stale.append(name)
    counts: dict[str, int] = {}
    for s in statuses.values():
        counts[s] = counts.get(s, 0) + 1
    killed = sum(1 for s in statuses.values() if s in KILLED)
    total = len(statuses) - len(eq_ok)
    survivors = sorted(n for n, s in statuses.items() if s not in KILLED and n not in eq_ok)
    score = killed / total if total else 1.0
    print(f"\n== {module}: {', '.join(files)}")
    print(f"mutmut {_mutmut_version()}, {date.today().isoformat()}"
          + (f", {elapsed / 60:.1f} min" if elapsed is not None else ""))
    print("statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"mutants {len(statuses)}, equivalent {len(eq_ok)}, killed {killed}, not killed {len(survivors)}")
    print(f"score {100 * score:.1f}% of non-equivalent mutants killed")
    for name in stale:
        print(f"stale equivalence entry (the mutant changed; counted as a survivor): {name}")
    for name in survivors:
        print(f"\n--- {statuses[name]}: {name}")
        print(_diff_lines(_show(work, name)))
    return {"module": module, "mutants": len(statuses), "equivalent": len(eq_ok), "killed": killed,
            "survivors": survivors, "score": score}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", choices=sorted(MODULES), help="module to mutate")
    p.add_argument("--list", action="store_true", help="list the modules and their test files")
    p.add_argument("--survivors", action="store_true",
                   help="rerun only the survivors of the previous run of --module (with the current tests)")
    p.add_argument("--report", action="store_true", help="print the previous run's result without running")
    p.add_argument("--mark-equivalent", metavar="MUTANT",
                   help="record MUTANT (of the last run of --module) as equivalent, with --reason")
    p.add_argument("--reason", help="why the mutant cannot change behaviour (with --mark-equivalent)")
    p.add_argument("--max-children", type=int, default=2, help="parallel test processes (default 2)")
    args = p.parse_args(argv)
    if args.list:
        for name, (files, tests) in MODULES.items():
            print(f"{name}: {' '.join(files)}\n    tests: {' '.join(tests)}")
        return 0
    if not args.module:
        _fail("give --module NAME (see --list)")
    try:
        _mutmut_version()
    except ImportError:
        _fail("mutmut is not installed: pip install 'mutmut>=3.8'")
    work = WORK / args.module
    if args.mark_equivalent:
        if not args.reason:
            _fail("--mark-equivalent needs --reason 'why it cannot change behaviour'")
        diff = _diff_lines(_show(work, args.mark_equivalent))
        if not diff:
            _fail(f"no mutant {args.mark_equivalent} in the last run of {args.module} (see its report)")
        entries = _load_equivalent()
        entries[args.mark_equivalent] = {"diff": diff, "reason": args.reason}
        EQUIVALENT.write_text(json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
        print(f"recorded {args.mark_equivalent} as equivalent")
        return 0
    if args.report:
        if not (work / "mutants").exists():
            _fail(f"no previous run of {args.module}: run without --report first")
        report(args.module, work, None)
        return 0
    names: list[str] = []
    previous: dict[str, int | None] = {}
    if args.survivors:
        if not (work / "mutants").exists():
            _fail(f"no previous run of {args.module}: run without --survivors first")
        files, _ = MODULES[args.module]
        changed = [f for f in files if (work / f).read_bytes() != (REPO / f).read_bytes()]
        if changed:  # mutant numbering follows the source: earlier verdicts no longer apply
            print(f"{', '.join(changed)} changed since the last run: running every mutant again")
            args.survivors = False
    if args.survivors:
        files, _ = MODULES[args.module]
        equivalent = _load_equivalent()
        names = sorted(n for n, s in _statuses(work, files).items() if s not in KILLED and n not in equivalent)
        previous = _exit_codes(work, files)
        if not names:
            print("no survivors to rerun")
            return 0
        # mutmut maps functions to tests once and then traces only *new* test names: a test extended since the
        # last run would not be rerun against the functions it now reaches. Trace every test again.
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    shared = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))
    if not shared.is_dir():
        print(f"warning: no shared data at {shared} (set KVPRESS_EXT_SHARED): the tests that need it are skipped "
              "or fail", file=sys.stderr)
    work = _prepare(args.module, fresh=not args.survivors)
    t0 = time.time()
    log_path = work / "mutmut.log"
    with open(log_path, "w") as log:
        proc = _mutmut(work, "run", "--max-children", str(args.max_children), *names, log=log)
    elapsed = time.time() - t0
    if proc.returncode != 0:
        print(log_path.read_text()[-3000:], file=sys.stderr)
        print(f"error: mutmut failed (exit {proc.returncode}); full log in {log_path}", file=sys.stderr)
        return 1
    if previous:
        _restore_unchecked(work, MODULES[args.module][0], previous)
    report(args.module, work, elapsed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
