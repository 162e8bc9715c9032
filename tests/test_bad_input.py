"""Bad input everywhere, as one table: every command with every bad input we know of.

Each case runs a command in-process (its ``main``) inside a temporary workspace that holds every input file, and
asserts the contract of ``kvpress_ext/core/errors.py``: exit status 2, exactly one line on stderr, which names the fix
(the case's expected words), no traceback, nothing on stdout, and nothing written or changed (a hash of every file
and directory in the workspace, the working directory included, before and after). The suite runs offline
(tests/conftest.py), so hub model ids and presses needing hub files are offline cases.

``python tests/test_bad_input.py`` prints the totals per command (recorded in docs/bad_input.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import shared_path

BAD_UTF8 = b"Once upon a time there was a \xff\xfe girl.\n"
NO_GPU_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
DEVICE_FIX = "use --device cpu" if not torch.cuda.is_available() else "use cuda:0"
PROMPT = "Once upon a time there was a little girl named Lily who liked to play"
DOCS = [{"question": "What is 2 + 3?", "solution": "2 + 3 = 5.", "answer": "5"},
        {"question": "What is 4 + 4?", "solution": "4 + 4 = 8.", "answer": "8"}]
CHUNKS = ["Tom had a big red ball. He liked to play with it in the park.",
          "One day, Tom saw a little dog. The dog was sad and alone.",
          "Lily and her mom went to the shop to buy some milk and bread."]
SENTENCES = "Tom had a red ball. He played in the park with his dog. The sun was warm. Lily liked to bake cakes. "

# Words a line names its fix with (checked on every case, beside the case's own expected words).
FIX_WORDS = ("pass ", "use ", "run ", "rerun", "choose", "re-save", "add ", "remove", "fix", "rebuild", "did you mean",
             "must", "see `", "download", "give ", "leave ", "its parameters are", "needs", "expects", "supported:",
             "build one", "choose one of", "create one", "recompute it")

# (command, arguments, words the line must contain). Placeholders: {M} model directory, {W} workspace, {G} an
# unsupported (GPT-2) model directory, {H} a hub id that is not cached, {D} a CUDA device this torch cannot use.
GEN = ["generate", "--model", "{M}", "--prompt", PROMPT, "--no_progress"]
GEN_FILE = ["generate", "--model", "{M}", "--no_progress", "--prompt_file"]
PRE = ["icl", "precompute", "--model", "{M}", "--out", "{W}/new_cache", "--budget", "16", "--window_size", "4",
       "--mode", "none"]
EVAL = ["icl", "eval", "--model", "{M}", "--cache", "{W}/cache", "--out", "{W}/new_eval.json"]
GRID = ["icl", "grid", "--model", "{M}", "--budgets", "16", "--window_size", "4", "--modes", "none",
        "--out_dir", "{W}/new_grid"]
A3P = ["a3", "precompute", "--model", "{M}", "--store", "{W}/new_store"]
A3A = ["a3", "ask", "--model", "{M}", "--store", "{W}/store", "--chunks", "{W}/chunks.jsonl", "--question",
       "Tom gave the dog", "--max_new_tokens", "2"]
PPL = ["--model", "{M}", "--no_progress", "--num_threads", "1", "--output_dir", "{W}/new_ppl"]
PPL_TEXT = [*PPL, "--dataset", "text", "--text_file", "{W}/story.txt", "--max_eval_tokens", "64"]
LC = ["--model", "{M}", "--no_progress", "--output_dir", "{W}/new_lc", "--max_new_tokens", "2"]

CASES = [
    # --- kvpress-ext generate ----------------------------------------------------------------------------------
    ("cli", [*GEN_FILE, "{W}/bad_utf8.txt"], "not valid UTF-8"),
    ("cli", [*GEN_FILE, "{W}/utf16.txt"], "re-save it as UTF-8"),
    ("cli", [*GEN_FILE, "{W}/missing.txt"], "does not exist"),
    ("cli", [*GEN_FILE, "{W}/hay"], "is a directory"),
    ("cli", [*GEN_FILE, "{W}/empty.txt"], "prompt is empty"),
    ("cli", [*GEN[:4], "   ", "--no_progress"], "prompt is empty"),
    ("cli", [*GEN, "--press", "knrom"], "Did you mean: knorm"),
    ("cli", [*GEN, "--press", "knorm", "--press_kwargs", "ratio=0.5"], "Its parameters are: compression_ratio"),
    ("cli", [*GEN, "--press", "knorm", "--press_kwargs", "compression_ratio=1.5"], "[0, 1)"),
    ("cli", [*GEN, "--press", "knorm", "--press_kwargs", "compression_ratio"], "KEY=VALUE"),
    ("cli", [*GEN, "--press_kwargs", "compression_ratio=0.5"], "needs --press NAME"),
    ("cli", [*GEN, "--press", "no_press", "--press_kwargs", "compression_ratio=0.5"], "takes no parameters"),
    ("cli", [*GEN, "--press", "snapkv", "--press_kwargs", "window_size=0"], "positive integer"),
    ("cli", [*GEN, "--press", "rkv", "--press_kwargs", "budget=-1"], "positive integer"),
    ("cli", [*GEN, "--temperature", "-1"], "--temperature must be >= 0"),
    ("cli", [*GEN, "--max_new_tokens", "0"], "--max_new_tokens must be a positive integer"),
    ("cli", [*GEN, "--top_p", "0"], "--top_p must be in (0, 1]"),
    ("cli", [*GEN, "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    ("cli", [*GEN, "--device", "{D}"], DEVICE_FIX),
    ("cli", [*GEN, "--device", "gpu0"], "use cpu, cuda or cuda:N"),
    ("cli", [*GEN, "--json", "{W}/outdir"], "is a directory; pass a file path"),
    ("cli", [*GEN, "--press", "qfilter"], "choose another press"),
    ("cli", [*GEN, "--press", "duo_attention"], "supported checkpoint"),
    ("cli", ["generate", "--model", "{W}/no_model", "--prompt", PROMPT], "pass --model a local model directory"),
    ("cli", ["generate", "--model", "{H}", "--prompt", PROMPT], "hf download"),
    ("cli", ["generate", "--model", "notamodel", "--prompt", PROMPT], "not in the local cache"),
    ("cli", ["generate", "--model", "{G}", "--prompt", PROMPT], "No kvpress_ext adapter for model_type 'gpt2'"),
    ("cli", [*GEN, "--max_new_tokens", "abc"], "invalid int value"),
    ("cli", [*GEN, "--dtype", "float8"], "invalid choice"),
    ("cli", [*GEN, "--attn_implementation", "magic"], "invalid choice"),
    ("cli", [*GEN, "--device_map", "{{bad"], "not valid JSON"),
    ("cli", [*GEN, "--prompt_file", "{W}/prompt.txt"], "not allowed with argument"),
    ("cli", ["generate", "--model", "{M}"], "one of the arguments --prompt --prompt_file is required"),
    # --- kvpress-ext (top level), list, describe -------------------------------------------------------------------
    ("cli", ["describe", "knrom"], "Did you mean: knorm"),
    ("cli", ["describe", "EveryChunk"], "kvpress-ext list"),
    ("cli", ["describe"], "required: name"),
    ("cli", ["nosuchcommand"], "invalid choice"),
    ("cli", [], "required: command"),
    ("cli", ["list", "--bogus"], "unrecognized arguments"),
    # --- kvpress-ext icl precompute ------------------------------------------------------------------------------
    ("cli", [*PRE, "--data", "{W}/bad_utf8.json"], "not valid UTF-8"),
    ("cli", [*PRE, "--data", "{W}/latin1.json"], "re-save it as UTF-8"),
    ("cli", [*PRE, "--data", "{W}/empty_list.json"], "add at least one question/solution/answer"),
    ("cli", [*PRE, "--data", "{W}/question_only.json"], "add its 'solution'"),
    ("cli", [*PRE, "--data", "{W}/missing.json"], "does not exist"),
    ("cli", [*PRE, "--data", "{W}/hay"], "is a directory"),
    ("cli", [*PRE, "--data", "{W}/not_json.json"], "is not valid JSON"),
    ("cli", [*PRE, "--data", "{W}/dict.json"], "must hold a JSON list"),
    ("cli", [*PRE, "--data", "{W}/strings.json"], "must hold a JSON list"),
    ("cli", [*PRE, "--data", "{W}/empty_question.json"], "empty or non-text 'question'"),
    ("cli", [*PRE, "--data", "{W}/empty.txt"], "is not valid JSON"),
    ("cli", [*PRE[:6], "--budget", "4", "--window_size", "8", "--data", "{W}/docs.json"], "larger than --window_size"),
    ("cli", [*PRE, "--data", "{W}/docs.json", "--budget", "0"], "expected a positive integer"),
    ("cli", [*PRE, "--data", "{W}/docs.json", "--mode", "bogus"], "invalid choice"),
    ("cli", [*PRE, "--data", "{W}/docs.json", "--num_epochs", "0"], "expected a positive integer"),
    ("cli", ["icl", "precompute", "--model", "{W}/no_model", "--out", "{W}/new_cache", "--data", "{W}/docs.json"],
     "pass --model a local model directory"),
    ("cli", ["icl", "precompute", "--model", "{H}", "--out", "{W}/new_cache", "--data", "{W}/docs.json"], "hf download"),
    ("cli", ["icl", "precompute", "--model", "{M}", "--data", "{W}/docs.json"], "required: --out"),
    # --- kvpress-ext icl eval -------------------------------------------------------------------------------------
    ("cli", [*EVAL[:4], "--cache", "{W}/missing_cache", *EVAL[6:], "--question", "hi"], "icl precompute"),
    ("cli", [*EVAL], "Pass --question TEXT or --data FILE"),
    ("cli", [*EVAL, "--data", "{W}/bad_utf8.json"], "not valid UTF-8"),
    ("cli", [*EVAL, "--data", "{W}/empty_list.json"], "add at least one"),
    ("cli", [*EVAL, "--data", "{W}/missing.json"], "does not exist"),
    ("cli", [*EVAL, "--data", "{W}/not_json.json"], "is not valid JSON"),
    ("cli", [*EVAL, "--question", "hi", "--repeat", "0"], "expected a positive integer"),
    ("cli", ["icl", "eval", "--model", "{H}", "--cache", "{W}/cache", "--out", "{W}/new_eval.json", "--question",
             "hi"], "hf download"),
    # --- kvpress-ext icl score ------------------------------------------------------------------------------------
    ("cli", ["icl", "score", "--eval", "{W}/missing_eval.json"], "run `kvpress-ext icl eval"),
    ("cli", ["icl", "score", "--eval", "{W}/empty.txt"], "is not valid JSON"),
    ("cli", ["icl", "score", "--eval", "{W}/eval_obj.json"], "no 'records' list"),
    ("cli", ["icl", "score", "--eval", "{W}/empty_list.json"], "no 'records' list"),
    ("cli", ["icl", "score", "--eval", "{W}/eval_norecords.json"], "holds no records"),
    ("cli", ["icl", "score", "--eval", "{W}/eval_shape.json"], "lacks an 'answer' and a 'generations' list"),
    ("cli", ["icl", "score", "--eval", "{W}/eval_gens.json"], "lacks an 'answer' and a 'generations' list"),
    ("cli", ["icl", "score", "--eval", "{W}/bad_utf8.json"], "not valid UTF-8"),
    ("cli", ["icl", "score", "--eval", "{W}/hay"], "is a directory"),
    ("cli", ["icl", "score", "--eval", "{W}/not_json.json"], "is not valid JSON"),
    ("cli", ["icl", "score"], "required: --eval"),
    # --- kvpress-ext icl grid -------------------------------------------------------------------------------------
    ("cli", [*GRID, "--data", "{W}/bad_utf8.json"], "not valid UTF-8"),
    ("cli", [*GRID, "--data", "{W}/empty_list.json"], "add at least one"),
    ("cli", [*GRID, "--data", "{W}/question_only.json"], "add its 'solution'"),
    ("cli", [*GRID, "--data", "{W}/docs.json", "--eval_data", "{W}/bad_utf8.json"], "--eval_data"),
    ("cli", [*GRID, "--data", "{W}/docs.json", "--budgets", "0"], "expected a positive integer"),
    ("cli", [*GRID, "--data", "{W}/docs.json", "--modes", "bogus"], "choose from takeaways"),
    ("cli", [*GRID[:4], "--budgets", "4", "--window_size", "8", "--out_dir", "{W}/new_grid", "--data",
             "{W}/docs.json"], "larger than --window_size"),
    ("cli", [*GRID, "--data", "{W}/docs.json", "--max_memory", "20GiB"], "DEVICE=SIZE"),
    # --- kvpress-ext icl cluster ---------------------------------------------------------------------------------
    ("cli", ["icl", "cluster", "build", "--embedder", "{M}", "--k", "2", "--out", "{W}/new_clusters.json", "--data",
             "{W}/bad_utf8.json"], "not valid UTF-8"),
    ("cli", ["icl", "cluster", "build", "--embedder", "{M}", "--k", "2", "--out", "{W}/new_clusters.json", "--data",
             "{W}/missing.json"], "does not exist"),
    ("cli", ["icl", "cluster", "build", "--embedder", "{M}", "--k", "2", "--out", "{W}/new_clusters.json", "--data",
             "{W}/empty_list.json"], "add at least one"),
    ("cli", ["icl", "cluster", "build", "--embedder", "{M}", "--k", "0", "--out", "{W}/new_clusters.json", "--data",
             "{W}/docs.json"], "expected a positive integer"),
    ("cli", ["icl", "cluster", "query", "--clusters", "{W}/missing.json", "--question", "q", "--out",
             "{W}/new_q.json"], "icl cluster build"),
    ("cli", ["icl", "cluster", "query", "--clusters", "{W}/bad_utf8.json", "--question", "q", "--out",
             "{W}/new_q.json"], "not valid UTF-8"),
    ("cli", ["icl", "cluster", "query", "--clusters", "{W}/eval_obj.json", "--question", "q", "--out",
             "{W}/new_q.json"], "build one with `kvpress-ext icl cluster build`"),
    ("cli", ["icl", "cluster", "query", "--clusters", "{W}/not_json.json", "--question", "q", "--out",
             "{W}/new_q.json"], "is not valid JSON"),
    ("cli", ["icl", "cluster"], "required: cluster_command"),
    # --- kvpress-ext a3 precompute ---------------------------------------------------------------------------------
    ("cli", [*A3P, "--chunks", "{W}/bad_utf8.jsonl"], "not valid UTF-8"),
    ("cli", [*A3P, "--chunks", "{W}/bad_utf8.txt"], "not valid UTF-8"),
    ("cli", [*A3P, "--chunks", "{W}/missing.jsonl"], "pass --chunks"),
    ("cli", [*A3P, "--chunks", "{W}/hay"], "pass --chunks"),
    ("cli", [*A3P, "--chunks", "{W}/not_json.json"], "not JSON/JSONL"),
    ("cli", [*A3P, "--chunks", "{W}/empty_list.json"], "add at least one chunk"),
    ("cli", [*A3P, "--chunks", "{W}/ints.json"], "neither a string nor an object"),
    ("cli", [*A3P, "--chunks", "{W}/empty_chunk.jsonl"], "remove empty chunks"),
    ("cli", [*A3P[:4], "--store", "{W}/store_file", "--chunks", "{W}/chunks.jsonl"], "is a file, not a kvpress-ext chunk store"),
    ("cli", [*A3P, "--chunks", "{W}/chunks.jsonl", "--chunk_tokens", "0"], "must be a positive integer"),
    ("cli", ["a3", "precompute", "--model", "{W}/no_model", "--store", "{W}/new_store", "--chunks",
             "{W}/chunks.jsonl"], "pass --model a local model directory"),
    ("cli", ["a3", "precompute", "--model", "{H}", "--store", "{W}/new_store", "--chunks", "{W}/chunks.jsonl"],
     "hf download"),
    ("cli", [*A3P, "--chunks", "{W}/chunks.jsonl", "--chunk_tokens", "x"], "invalid int value"),
    # --- kvpress-ext a3 ask ----------------------------------------------------------------------------------------
    ("cli", [*A3A[:6], "--chunks", "{W}/bad_utf8.jsonl", *A3A[8:]], "not valid UTF-8"),
    ("cli", [*A3A[:4], "--store", "{W}/store_file", *A3A[6:]], "is a file, not a kvpress-ext chunk store"),
    ("cli", [*A3A, "--strategy", "nope"], "choose from blend, debug"),
    ("cli", [*A3A, "--rate", "1.5"], "[0, 1]"),
    ("cli", [*A3A, "--rate", "abc"], "[0, 1]"),
    ("cli", [*A3A[:4], "--store", "{W}/missing_store", *A3A[6:]], "--compute_missing"),
    ("cli", [*A3A, "--evict_kwargs", "compression_ratio=0.5"], "--evict NAME"),
    ("cli", [*A3A, "--evict", "knrom"], "Did you mean: knorm"),
    ("cli", [*A3A, "--evict", "snapkv", "--evict_kwargs", "compression_ratio=2"], "[0, 1)"),
    ("cli", [*A3A[:8], "--question", "   ", "--max_new_tokens", "2"], "pass the question text"),
    ("cli", [*A3A, "--max_new_tokens", "0"], "must be a positive integer"),
    ("cli", [*A3A, "--json", "{W}/outdir"], "is a directory; pass a file path"),
    ("cli", [*A3A[:6], "--chunks", "{W}/other_chunks.jsonl", *A3A[8:]], "run `kvpress-ext a3 precompute"),
    ("cli", [*A3A, "--strategy", "surprisal_chunk"], "--surprisal"),
    ("cli", [*A3A[:6], "--chunks", "{W}/missing.jsonl", *A3A[8:]], "pass --chunks"),
    ("cli", [*A3A, "--evict", "qfilter"], "choose another press"),
    # --- evaluation/perplexity.py ----------------------------------------------------------------------------------
    ("perplexity", [*PPL, "--dataset", "text", "--text_file", "{W}/bad_utf8.txt"], "not valid UTF-8"),
    ("perplexity", [*PPL, "--dataset", "text", "--text_file", "{W}/utf16.txt"], "re-save it as UTF-8"),
    ("perplexity", [*PPL, "--dataset", "text", "--text_file", "{W}/missing.txt"], "Pass an existing file"),
    ("perplexity", [*PPL, "--dataset", "text", "--text_file", "{W}/hay"], "Pass an existing file"),
    ("perplexity", [*PPL_TEXT, "--press", "knrom"], "Did you mean: knorm"),
    ("perplexity", [*PPL_TEXT, "--press", "knorm", "--compression_ratio", "1.5"], "[0, 1)"),
    ("perplexity", [*PPL_TEXT, "--press", "knorm", "--press_kwargs", "window_size=4"], "Its parameters are"),
    ("perplexity", [*PPL_TEXT, "--press", "knorm", "--press_kwargs", "window_size"], "KEY=VALUE"),
    ("perplexity", [*PPL_TEXT, "--press", "all", "--press_kwargs", "x=1"], "cannot be combined with --press all"),
    ("perplexity", [*PPL_TEXT, "--context_limit", "0"], "must be a positive integer"),
    ("perplexity", [*PPL_TEXT, "--num_runs", "0"], "must be a positive integer"),
    ("perplexity", [*PPL_TEXT, "--model", "{H}"], "hf download"),
    ("perplexity", [*PPL_TEXT, "--model", "{G}"], "No kvpress_ext adapter for model_type 'gpt2'"),
    ("perplexity", [*PPL_TEXT, "--model", "{W}/no_model"], "pass --model a local model directory"),
    ("perplexity", [*PPL_TEXT, "--device", "{D}"], DEVICE_FIX),
    ("perplexity", [*PPL, "--dataset", "wikitext", "--max_eval_tokens", "64"], "Use --dataset text --text_file"),
    ("perplexity", [*PPL_TEXT, "--dataset", "bogus"], "invalid choice"),
    ("perplexity", [*PPL_TEXT, "--press", "qfilter", "--ppl_apply_press", "--no_speed"], "choose another press"),
    ("perplexity", [*PPL_TEXT, "--context_limit", "x"], "invalid int value"),
    ("perplexity", [*PPL_TEXT, "--press", "knorm", "--max_memory", "20GiB"], "DEVICE=SIZE"),
    ("perplexity", [*PPL_TEXT, "--device_map", "{{bad"], "not valid JSON"),
    ("perplexity", [*PPL_TEXT, "--device_map", "{W}/missing_map.json"], "does not exist"),
    ("perplexity", [*PPL_TEXT, "--device", "cpu", "--device_map", "auto"], "exclude each other"),
    ("perplexity", [*PPL_TEXT, "--press", "knorm", "snapkv", "--executor", "slurm"], "invalid choice"),
    # --- evaluation/longbench.py -----------------------------------------------------------------------------------
    ("longbench", [*LC, "--data_file", "{W}/bad_utf8.jsonl"], "not valid UTF-8"),
    ("longbench", [*LC, "--data_file", "{W}/missing.jsonl"], "does not exist"),
    ("longbench", [*LC, "--data_file", "{W}/not_json.json"], "is not valid JSON/JSONL"),
    ("longbench", [*LC, "--data_file", "{W}/empty.txt"], "holds no records"),
    ("longbench", [*LC, "--data_file", "{W}/ruler.jsonl"], "lacks field(s) input, answers"),
    ("longbench", [*LC, "--data_file", "{W}/lb.jsonl", "--strategies", "nope"], "choose from"),
    ("longbench", [*LC, "--data_file", "{W}/lb.jsonl", "--evict", "no_such_press"], "kvpress-ext list"),
    ("longbench", [*LC, "--data_file", "{W}/lb.jsonl", "--task", "nosuchtask"], "unknown LongBench task"),
    ("longbench", [*LC, "--data_file", "{W}/lb.jsonl", "--strategies", "blend", "--rate", "2"], "use rates in [0, 1]"),
    ("longbench", [*LC, "--data_file", "{W}/lb.jsonl", "--strategies", "blend", "--evict", "snapkv",
                   "--compression_ratio", "1.5"], "[0, 1)"),
    ("longbench", [*LC, "--data_file", "{W}/lb.jsonl", "--model", "{H}"], "hf download"),
    ("longbench", [*LC, "--data_file", "{W}/lb.jsonl", "--chunk_tokens", "0"], "must be a positive integer"),
    ("longbench", [*LC], "pass --data_file"),
    # --- evaluation/ruler.py ---------------------------------------------------------------------------------------
    ("ruler", [*LC, "--data_file", "{W}/bad_utf8.jsonl"], "not valid UTF-8"),
    ("ruler", [*LC, "--data_file", "{W}/missing.jsonl"], "does not exist"),
    ("ruler", [*LC, "--data_file", "{W}/lb.jsonl"], "lacks field(s) question, outputs"),
    ("ruler", [*LC, "--haystack_dir", "{W}/hay_bad"], "not valid UTF-8"),
    ("ruler", [*LC, "--haystack_dir", "{W}/missing_hay"], "no haystack text"),
    ("ruler", [*LC, "--haystack_dir", "{W}/hay", "--lengths", "8"], "at least 16 tokens"),
    ("ruler", [*LC, "--data_file", "{W}/ruler.jsonl", "--press", "snapkv", "--compression_ratio", "1.5"], "[0, 1)"),
    ("ruler", [*LC, "--data_file", "{W}/ruler.jsonl", "--press", "a3"], "as --strategies"),
    ("ruler", [*LC, "--data_file", "{W}/ruler.jsonl", "--max_samples", "0"], "must be a positive integer"),
    # --- evaluation/needle.py --------------------------------------------------------------------------------------
    ("needle", [*LC, "--haystack_dir", "{W}/hay_bad"], "not valid UTF-8"),
    ("needle", [*LC, "--haystack_dir", "{W}/missing_hay"], "no haystack text"),
    ("needle", [*LC, "--haystack_file", "{W}/bad_utf8.txt"], "not valid UTF-8"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--press", "no_such_press"], "kvpress-ext list"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--query_aware", "--press", "snapkv", "--compression_ratio", "1"],
     "[0, 1)"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--depths", "1.5"], "must lie in [0, 1]"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--lengths", "8"], "at least 16 tokens"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--model", "{H}"], "hf download"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--strategies", "nope"], "choose from"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--lengths", "x"], "invalid int value"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--model", "{G}"], "No kvpress_ext adapter for model_type 'gpt2'"),
    ("needle", [*LC, "--summary_from", "{W}/hay"], "holds no long-context cells"),
    ("needle", ["--summary_from", "{W}/hay"], "pass --output_dir"),
    # --- examples/quickstart.py ------------------------------------------------------------------------------------
    ("quickstart", ["--model", "{H}"], "hf download"),
    ("quickstart", ["--model", "{W}/no_model"], "pass --model a local model directory"),
    ("quickstart", ["--model", "{G}"], "No kvpress_ext adapter for model_type 'gpt2'"),
    ("quickstart", ["--bogus"], "unrecognized arguments"),
]

# Hostile inputs (a careful attacker, a clumsy user), by defect class of docs/bad_input.md ("Hostile inputs").
HOSTILE = [
    # 1. a folder that merely holds a file named like ours is not ours (with or without --recompute)
    ("cli", [*PRE, "--data", "{W}/docs.json", "--out", "{W}/user_meta"], "not a kvpress-ext cache"),
    ("cli", [*PRE, "--data", "{W}/docs.json", "--out", "{W}/user_meta", "--recompute"], "not a kvpress-ext cache"),
    ("cli", [*A3P, "--chunks", "{W}/chunks.jsonl", "--store", "{W}/user_meta"], "not a kvpress-ext chunk store"),
    # 2. a JSON file is replaced only when it carries our mark: a saved cache's metadata, a user's JSON
    ("cli", [*GEN, "--json", "{W}/cache/metadata.json"], "not a JSON output of kvpress-ext"),
    ("cli", [*GEN, "--json", "{W}/user.json"], "not a JSON output of kvpress-ext"),
    ("cli", [*A3A, "--json", "{W}/user.json"], "not a JSON output of kvpress-ext"),
    ("cli", [*EVAL, "--question", "hi", "--out", "{W}/user.json"], "not a JSON output of kvpress-ext"),
    ("cli", ["icl", "cluster", "build", "--embedder", "{M}", "--k", "2", "--out", "{W}/user.json", "--data",
             "{W}/docs.json"], "not a JSON output of kvpress-ext"),
    # 5. a lock file planted as a symbolic link is refused, never followed
    ("cli", [*PRE, "--data", "{W}/docs.json", "--out", "{W}/lockdir/c"], "symbolic link where kvpress-ext keeps"),
    ("cli", [*A3P, "--chunks", "{W}/chunks.jsonl", "--store", "{W}/lockdir/s"], "symbolic link where kvpress-ext keeps"),
    # 6. a results folder whose cells/ is a symbolic link
    ("perplexity", [*PPL_TEXT, "--output_dir", "{W}/linked_results"], "cells is a symbolic link"),
    ("cli", [*GRID, "--data", "{W}/docs.json", "--out_dir", "{W}/linked_results"], "cells is a symbolic link"),
    ("needle", [*LC, "--haystack_dir", "{W}/hay", "--lengths", "64", "--depths", "0.5", "--output_dir",
                "{W}/linked_results"], "cells is a symbolic link"),
    # 7. size parameters are bounded, also when read back from a saved cache
    ("cli", [*GEN, "--press", "rkv", "--press_kwargs", "kernel_size=1000000000001"], "out of range"),
    ("cli", [*EVAL, "--cache", "{W}/cache_bigk", "--question", "hi"], "cannot be rebuilt"),
    ("perplexity", [*PPL_TEXT, "--press", "rkv", "--press_kwargs", "kernel_size=1000000000001"], "out of range"),
    ("cli", [*A3A, "--evict", "streaming_llm", "--evict_kwargs", "n_sink=100000000"], "out of range"),
    # 10 and 16. crafted caches with valid checksums: checked against the model before use
    ("cli", [*EVAL, "--cache", "{W}/cache_int", "--question", "hi"], "not floating point"),
    ("cli", [*EVAL, "--cache", "{W}/cache_heads", "--question", "hi"], "key/value heads"),
    ("cli", [*EVAL, "--cache", "{W}/cache_layers", "--question", "hi"], "the model has"),
    # 11 and 14. values out of range, numbers that overflow or are not finite
    ("cli", [*GEN, "--temperature", "nan"], "--temperature must be 0 (greedy)"),
    ("cli", [*GEN, "--temperature", "1e-300"], "--temperature must be 0 (greedy)"),
    ("cli", [*GEN, "--seed", "10000000000000000000000"], "a seed must be in"),
    ("cli", [*EVAL, "--question", "hi", "--temperature", "-1"], "must be 0 (greedy)"),
    ("cli", [*EVAL, "--question", "hi", "--top_p", "2"], "must be in (0, 1]"),
    ("cli", [*PRE, "--data", "{W}/docs.json", "--rotation_offset", "100000000000000000000"], "must be within"),
    ("cli", [*PRE, "--data", "{W}/bigint.json"], "integer of 5000 digits"),
    ("cli", [*GEN, "--press", "streaming_llm", "--press_kwargs", "n_sink=-5"], "out of range"),
    ("cli", [*GEN, "--press", "dms", "--press_kwargs", "threshold=nan"], "finite number"),
    ("perplexity", [*PPL_TEXT, "--max_eval_tokens", "-5"], "positive integer"),
    ("perplexity", [*PPL_TEXT, "--speed_context", "-4"], "positive integer"),
    ("perplexity", [*PPL_TEXT, "--context_limit", "100000"], "beyond the context of model"),  # stories260k: 512
    ("perplexity", [*PPL_TEXT, "--speed_context", "513", "--press", "knorm"], "pass --speed_context 512 or less"),
    # 12. an existing cache is reused only for the settings that made it
    ("cli", [*PRE[:6], "--budget", "12", "--window_size", "4", "--mode", "none", "--data", "{W}/docs.json", "--out",
             "{W}/cache"], "other settings: budget 16 (asked 12)"),
    # 13. nested JSON in every file a command reads
    ("cli", [*PRE, "--data", "{W}/deep.json"], "more than 100 deep"),
    ("cli", [*EVAL, "--data", "{W}/deep.json"], "more than 100 deep"),
    ("cli", [*GRID, "--data", "{W}/deep.json"], "more than 100 deep"),
    ("cli", ["icl", "score", "--eval", "{W}/deep.json"], "more than 100 deep"),
    ("cli", ["icl", "cluster", "query", "--clusters", "{W}/deep.json", "--question", "q", "--out", "{W}/new_q.json"],
     "more than 100 deep"),
    ("cli", [*A3P, "--chunks", "{W}/deep.json"], "more than 100 deep"),
    ("cli", [*GEN, "--device_map", "{W}/deep.json"], "more than 100 deep"),
    ("cli", [*EVAL, "--cache", "{W}/cache_deep", "--question", "hi"], "more than 100 deep"),
    ("longbench", [*LC, "--data_file", "{W}/deep.json"], "more than 100 deep"),
    # 15. press parameters kvpress asserts on or divides by, checked by our registry first
    ("cli", [*GEN, "--press", "snapkv", "--press_kwargs", "kernel_size=4"], "must be odd"),
    ("cli", [*GEN, "--press", "chunkkv", "--press_kwargs", "chunk_length=0"], "positive integer"),
    ("cli", [*GEN, "--press", "block", "--press_kwargs", "block_size=0"], "positive integer"),
    ("cli", [*A3A, "--evict", "snapkv", "--evict_kwargs", "kernel_size=4"], "must be odd"),
    # within the bound, beyond the fused cache's length
    ("cli", [*A3A, "--evict", "streaming_llm", "--evict_kwargs", "n_sink=100000"], "cannot compress the"),
    ("cli", [*A3A, "--evict", "snapkv", "--evict_kwargs", "window_size=100000"], "-token fused cache"),
    ("perplexity", [*PPL_TEXT, "--press", "chunkkv", "--press_kwargs", "chunk_length=0"], "positive integer"),
    # 18. text that is not UTF-8 (a lone surrogate on the command line)
    ("cli", [*GEN[:4], "caf\udcff", "--no_progress"], "not valid UTF-8 text"),
    ("cli", [*A3A[:8], "--question", "what\udcff", "--max_new_tokens", "2"], "not valid UTF-8 text"),
    ("cli", [*EVAL, "--question", "x\udcff"], "not valid UTF-8 text"),
    # 19. unclear messages made clear
    ("cli", [*GEN_FILE, "/dev/zero"], "not a regular file"),
    ("cli", [*GEN, "--press", "a3"], "kvpress-ext a3 ask"),
    ("cli", ["generate", "--model", "", "--prompt", PROMPT], "--model is empty"),
    ("cli", [*GRID[:4], "--budgets", ",", *GRID[6:], "--data", "{W}/docs.json"], "comma-separated positive integers"),
    # a flipped byte in a chunk file: the reason stays beside the fix
    ("cli", [*A3A[:4], "--store", "{W}/store_flipped", *A3A[6:]], "does not match its checksum (corrupt or changed"),
    ("cli", [*A3P[:4], "--store", "{W}/store_flipped", "--chunks", "{W}/chunks.jsonl"], "does not match its checksum"),
]
CASES += HOSTILE


def _case_id(case) -> str:
    command, argv, _ = case
    words = [a for a in argv if a not in ("{M}", "--model", "--no_progress")]
    return f"{command}:" + " ".join(w.replace("{W}/", "") for w in words[:8])[:80]


def totals() -> dict[str, int]:
    """Cases per command (``kvpress-ext icl score``, ``perplexity``, ...) and in all."""
    counts: Counter = Counter()
    for command, argv, _ in CASES:
        if command != "cli":
            counts[command] += 1
        elif argv and argv[0] in ("icl", "a3") and len(argv) > 1 and not argv[1].startswith("-"):
            counts[f"kvpress-ext {argv[0]} {argv[1]}"] += 1
        elif argv and argv[0] in ("generate", "list", "describe"):
            counts[f"kvpress-ext {argv[0]}"] += 1
        else:
            counts["kvpress-ext (no or unknown command)"] += 1
    return {**dict(sorted(counts.items())), "total": len(CASES)}


# --- the workspace -------------------------------------------------------------------------------------------
def _jsonl(items) -> str:
    return "\n".join(json.dumps(x) for x in items) + "\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Every input of the table: good files, bad files, an ICL cache, an A³ store, an unsupported model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvpress_ext.cli import main
    from kvpress_ext.icl import workflow as wf
    from kvpress_ext.runtime.models import load_model

    w = tmp_path_factory.mktemp("bad_input")
    model_dir = str(shared_path("models", "stories260k"))
    texts = {
        "prompt.txt": PROMPT, "story.txt": SENTENCES * 8, "empty.txt": "",
        "docs.json": json.dumps(DOCS), "empty_list.json": "[]", "dict.json": json.dumps(DOCS[0]),
        "question_only.json": json.dumps([{"question": "What is 1 + 1?"}]), "strings.json": '["a", "b"]',
        "empty_question.json": json.dumps([{"question": " ", "solution": "x", "answer": "1"}]),
        "not_json.json": "{this is not json", "ints.json": "[1, 2]",
        "chunks.jsonl": _jsonl(CHUNKS), "other_chunks.jsonl": _jsonl(["A chunk never precomputed.", CHUNKS[0]]),
        "empty_chunk.jsonl": _jsonl([CHUNKS[0], ""]),
        "eval_obj.json": "{}", "eval_norecords.json": json.dumps({"records": []}),
        "eval_shape.json": json.dumps({"records": [{"question": "q"}]}),
        "eval_gens.json": json.dumps({"records": [{"question": "q", "answer": "1", "generations": [1, 2]}]}),
        "lb.jsonl": _jsonl([{"context": SENTENCES, "input": "What color was the ball?", "answers": ["red"]}]),
        "ruler.jsonl": _jsonl([{"context": SENTENCES * 3, "question": " What is the number?", "outputs": ["7"]}]),
        "store_file": "not a store\n",
    }
    for name, text in texts.items():
        (w / name).write_text(text, encoding="utf-8")
    raw = {"bad_utf8.txt": BAD_UTF8, "bad_utf8.json": b'[{"question": "\xff", "solution": "s", "answer": "1"}]',
           "bad_utf8.jsonl": b'{"text": "caf\xe9"}\n', "latin1.json": json.dumps(DOCS).replace("5", "\u00e95").encode("latin-1"),
           "utf16.txt": PROMPT.encode("utf-16")}
    for name, data in raw.items():
        (w / name).write_bytes(data)
    for folder, files in {"hay": {"a.txt": SENTENCES * 4}, "hay_bad": {"a.txt": SENTENCES * 4}}.items():
        (w / folder).mkdir()
        for name, text in files.items():
            (w / folder / name).write_text(text, encoding="utf-8")
    (w / "hay_bad" / "b.txt").write_bytes(BAD_UTF8)
    (w / "outdir").mkdir()
    _hostile_files(w)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(w / "gpt2")
    model, tok = load_model(model_dir, device="cpu")
    wf.precompute(model, tok, DOCS, w / "cache", budget=16, window_size=4, buffer=8, mode="none")
    assert main(["a3", "precompute", "--model", model_dir, "--chunks", str(w / "chunks.jsonl"),
                 "--store", str(w / "store")]) == 0
    _crafted_caches(w)
    _flipped_store(w)
    return w, {"M": model_dir, "W": str(w), "G": str(w / "gpt2"), "H": "some-org/not-a-cached-model",
               "D": NO_GPU_DEVICE}


def _hostile_files(w: Path) -> None:
    """Inputs of the hostile cases: deep JSON, a 5000-digit number, users' files named like ours, planted links."""
    (w / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (w / "bigint.json").write_text('[{"question": "q", "solution": "s", "answer": ' + "9" * 5000 + "}]")
    (w / "user_meta").mkdir()
    (w / "user_meta" / "metadata.json").write_text('{"my": 1}')
    (w / "user.json").write_text('{"my": 1}')
    (w / "victim.txt").write_text("a user's file that must keep its bytes\n")
    (w / "lockdir").mkdir()
    for name in (".c.lock", ".s.lock"):
        (w / "lockdir" / name).symlink_to(w / "victim.txt")
    (w / "victim_dir").mkdir()
    (w / "victim_dir" / "keep.txt").write_text("keep\n")
    (w / "linked_results").mkdir()
    (w / "linked_results" / ".kvpress-ext-results").write_text("ours\n")
    (w / "linked_results" / "cells").symlink_to(w / "victim_dir", target_is_directory=True)


def _flipped_store(w: Path) -> None:
    """A copy of the A3 store with one byte flipped in every entry's tensor file (checksums left as they were)."""
    import shutil

    shutil.copytree(w / "store", w / "store_flipped")
    for tensors in (w / "store_flipped").rglob("tensors.safetensors"):
        data = bytearray(tensors.read_bytes())
        data[-5] ^= 0xFF
        tensors.write_bytes(bytes(data))


def _crafted_caches(w: Path) -> None:
    """Copies of the saved cache, each changed one way with its checksum recomputed (so only the new checks stop
    them): a press parameter of 10**12, deeply nested metadata, int64 tensors, one head, an extra layer."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kvpress_ext.storage.cache_files import file_checksum

    def copy(name, meta_fn=None, tensor_fn=None):
        d = w / name
        shutil.copytree(w / "cache", d)
        meta = json.loads((d / "metadata.json").read_text())
        if tensor_fn is not None:
            tensors = tensor_fn(load_file(str(d / "tensors.safetensors")), meta)
            save_file(tensors, str(d / "tensors.safetensors"), metadata={"format_version": "2"})
            meta["checksums"]["tensors.safetensors"] = file_checksum(d / "tensors.safetensors")
        if meta_fn is not None:
            meta_fn(meta)
        (d / "metadata.json").write_text(json.dumps(meta))

    copy("cache_bigk", meta_fn=lambda m: m["press"]["params"].update(kernel_size=10**12))
    copy("cache_int", tensor_fn=lambda t, m: {k: v.to(torch.int64) for k, v in t.items()})
    copy("cache_heads", tensor_fn=lambda t, m: {k: v[:, :1].contiguous() for k, v in t.items()})

    def extra_layer(t, m):
        n = m["num_layers"]
        m.update(num_layers=n + 1, seq_lengths=[*m["seq_lengths"], m["seq_lengths"][0]])
        return {**t, f"layer{n}.keys": t["layer0.keys"].clone(), f"layer{n}.values": t["layer0.values"].clone()}

    copy("cache_layers", tensor_fn=extra_layer)
    copy("cache_deep")
    (w / "cache_deep" / "metadata.json").write_text("[" * 100000 + "]" * 100000)


def _snapshot(root: Path) -> dict[str, str]:
    """Every file's SHA-256 and every directory under ``root``, by relative path."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            state[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            path = os.path.join(dirpath, f)
            state[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return state


def _script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"bad_input_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runners():
    from kvpress_ext.cli import main as cli_main
    from kvpress_ext.cli.perplexity import main as perplexity_main

    scripts = {name: _script(name, REPO / "evaluation" / f"{name}.py") for name in ("longbench", "ruler", "needle")}
    quickstart = _script("quickstart", REPO / "examples" / "quickstart.py")
    return {"cli": cli_main, "perplexity": perplexity_main, "quickstart": quickstart.main,
            **{name: module.main for name, module in scripts.items()}}


def _run(runner, argv) -> tuple[int, list[str]]:
    """Exit status and the user-visible warnings (shown on stderr outside pytest) of one in-process run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = runner(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning, FutureWarning)
    shown = [str(w.message) for w in caught if not issubclass(w.category, hidden)]
    return rc, shown


@pytest.mark.parametrize("command,argv,expect", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, runners, capsys, monkeypatch, command, argv,
                                                         expect):
    root, values = workspace
    argv = [a.format(**values) for a in argv]
    monkeypatch.chdir(root)  # anything written to a default relative path lands in the hashed workspace
    before = _snapshot(root)
    capsys.readouterr()
    rc, shown_warnings = _run(runners[command], argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()] + shown_warnings
    assert rc == 2, (rc, err)
    assert len(lines) == 1, lines
    assert "Traceback" not in err and not re.match(r"\w+(Error|Exception|Exit)\b", lines[0]), err
    assert expect.lower() in lines[0].lower(), lines[0]
    assert any(word in lines[0].lower() for word in FIX_WORDS), f"names no fix: {lines[0]}"
    assert out.strip() == "", out
    assert _snapshot(root) == before, "the command wrote or changed files"


def test_the_table_covers_every_command_and_at_least_120_cases():
    counts = totals()
    assert counts["total"] >= 120
    for command in ("kvpress-ext generate", "kvpress-ext icl precompute", "kvpress-ext icl eval", "kvpress-ext icl score",
                    "kvpress-ext icl grid", "kvpress-ext icl cluster", "kvpress-ext a3 precompute", "kvpress-ext a3 ask",
                    "kvpress-ext describe", "perplexity", "longbench", "ruler", "needle", "quickstart"):
        assert counts.get(command, 0) >= 2, command


def test_every_torch_load_in_the_repository_is_weights_only():
    import ast

    offenders = []
    for path in [*REPO.glob("kvpress_ext/**/*.py"), *REPO.glob("evaluation/*.py"), *REPO.glob("benchmarks/*.py"),
                 *REPO.glob("examples/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []



def test_every_error_class_derives_from_kvpress_ext_error():
    """One error hierarchy: every exception class kvpress_ext defines is a KVPressExtError, so one ``except`` in
    each entry point turns any of them into the one-line exit 2 (warnings are not errors)."""
    import inspect
    import pkgutil

    import kvpress_ext
    from kvpress_ext.core.errors import KVPressExtError

    defined = {}
    for info in pkgutil.walk_packages(kvpress_ext.__path__, "kvpress_ext."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, Exception) and not issubclass(cls, Warning):
                defined[f"{info.name}.{name}"] = cls
    assert len(defined) >= 15 and "kvpress_ext.evaluation.longcontext.InputError" in defined, sorted(defined)
    outside = sorted(name for name, cls in defined.items() if not issubclass(cls, KVPressExtError))
    assert outside == [], f"error classes outside the KVPressExtError hierarchy: {outside}"

if __name__ == "__main__":
    for name, count in totals().items():
        print(f"{name:36s} {count}")
