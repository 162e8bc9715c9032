"""Write docs/results/perplexity.md (and the ratio plot) from the sweep directories under results/perplexity.

    PYTHONPATH=$PWD python evaluation/perplexity_report.py [--results_dir results/perplexity]
        [--markdown docs/results/perplexity.md] [--plot docs/results/perplexity_ratios.png]

Every input is checked before anything is written; the outputs are written atomically, each only over a file of
the same kind (a Markdown report, an image). ``--help`` writes nothing.
"""

import sys
from pathlib import Path

from kvpress_ext.cli.common import command_entry
from kvpress_ext.cli.perplexity_report import parse_args
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.evaluation.results import plot_ratio_sweeps, ratio_table
from kvpress_ext.storage.inputs import load_json
from kvpress_ext.storage.safe_write import check_output_file, write_output

RATIOS = (0.25, 0.5, 0.75)


@command_entry("perplexity_report")
def main(argv=None) -> int:
    args = parse_args(argv, __doc__)

    root = Path(args.results_dir)
    dirs = {x: root / f"sweep_r{x}" for x in RATIOS}
    try:
        missing = [str(d) for d in [*dirs.values(), root / "no_press"] if not any(Path(d).glob("*.json"))]
        if missing:
            raise KVPressExtError(f"no sweep results (JSON files) in {', '.join(missing)}; run the sweeps listed in "
                                  "docs/results/perplexity.md first, or pass --results_dir")
        check_output_file(args.markdown, kind="markdown", flag="--markdown")
        check_output_file(args.plot, kind="image", flag="--plot")
        base = load_json(next((root / "no_press").glob("*.json")).read_bytes(), "the no_press run")
        table = ratio_table(dirs)
        done = {x: len(list(Path(d).glob("*.json"))) for x, d in dirs.items()}
        doc = render(base, table, done)
        plot_ratio_sweeps(dirs, args.plot)
        write_output(args.markdown, doc, kind="markdown", flag="--markdown")
    except (KVPressExtError, OSError, ValueError, KeyError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {args.markdown} and {args.plot} ({done} JSON files per ratio)")
    return 0


def render(base: dict, table: str, done: dict) -> str:
    return f"""# Perplexity under KV-cache compression (stories260k, TinyStories validation)

Machine: CPU (AMD EPYC), 2 cores, otherwise idle (load average under 1 at the end); the sweeps ran one after the
other with `--threads 1` (re-run 2026-11-26 after the token-order fix below; earlier runs: 2026-11-23 on the idle
machine, and one on the machine shared with other jobs with 20-50x lower tok/s, same perplexities).
torch {base['versions']['torch']}, transformers
{base['versions']['transformers']}, kvpress {base['versions']['kvpress']}.

## Commands

One sweep per ratio (run one after another):

```
PYTHONPATH=$PWD python evaluation/perplexity.py --model ../shared/models/stories260k --dataset text \\
  --text_file ../shared/data/tinystories_val.txt --max_eval_tokens 8192 --context_limit 512 --chunk_size 128 \\
  --decode_chunk_size 8 --press all --compression_ratio R --ppl_apply_press --max_new_tokens 64 --num_runs 3 \\
  --threads 1 --output_dir results/perplexity/sweep_rR      # R in 0.25, 0.5, 0.75
```

and the reference (the same with `--press no_press`, output `results/perplexity/no_press`).
`summary.md`/`summary.png` per sweep: `python evaluation/perplexity.py --summarize results/perplexity/sweep_rR`.

## Setup

- 8,192 tokens of `tinystories_val.txt`, cut into 16 windows of 512 tokens (the model's trained context); each
  window starts from an empty cache; 8,176 tokens are scored (the first token of each window has no prediction).
- `--ppl_apply_press`: each window is fed in chunks of 128 tokens inside `apply_press`; every chunk's logits come from
  the cache the press compressed after the previous chunk. Prefill presses are wrapped in `EveryChunkPress`
  (`kvpress_ext/core/chunked_prefill.py`) so they compress after every chunk, keeping `(1 - ratio)` of the tokens seen
  so far (256 of 512 at ratio 0.5). Presses that compress while decoding (`decoding`, `compression_ratio_decoding`,
  `dms`, `cam`, `prefill_decoding`, later `lazy_streaming`/`rkv`) get the first chunk as a prefill and the rest in
  forwards of 8 tokens (`--decode_chunk_size 8`).
- KV bytes: key+value tensors of the cache at the end of the last window (float32; full cache = 512 tokens x 5 layers x
  4 KV heads x 8 dims x 4 bytes x 2 = 655,360 bytes).
- Decode tok/s: greedy decoding of 64 tokens after a 512-token prefill under the press, median of 3 runs after a warm-up.

Reference without compression: ppl **{base['perplexity']['ppl']:.4f}**, {base['cache']['cache_bytes_end']:,} KV bytes,
{base['speed']['decode_tok_per_s']:.1f} tok/s (teacher-forced, one forward per window, gives the same loss; checked in
`tests/test_perplexity.py` to 1e-4).

## Results

Presses without a `compression_ratio` parameter (`decoding`, `dms`, `think`, `simlayerkv`, `prefill_decoding`,
`cam`'s decoding part...) run with their registry defaults, so their three columns repeat one setting; the decoding
presses' defaults (`compression_interval=512`, `target_size=2048`) never trigger within a 512-token window, so
they equal the reference. `lazy_streaming` and `rkv` have a token budget instead of a ratio: the sweep sizes them
with `from_compression_ratio` to keep `(1 - R) x 512` tokens (lazy: `cap_total`, slack an eighth of it; rkv:
`budget`), so they sit at the same KV budget as the ratio presses. JSON files found per ratio: {done} (a press missing from both the table and the
list below had not run yet). Plot for ratio 0.5: `perplexity_r0.5.png` (copy of `results/perplexity/sweep_r0.5/summary.png`).
Perplexity against the ratio for every press that depends on it: `perplexity_ratios.png` (below).
Refresh with `PYTHONPATH=$PWD python evaluation/perplexity_report.py`.

Observations: at ratio 0.5 the attention-based scorers (observed_attention 3.988, snapkv 3.989, lagkv 3.993,
keydiff 3.993, streaming_llm 3.993) stay within 0.4% of the uncompressed 3.979; knorm (4.170) and key_rerotation
(4.206) lose most. At 0.75 the order is similar (observed_attention 4.006, lagkv 4.026, streaming_llm 4.026). rkv holds
up best as the budget shrinks (3.979 / 3.988 at 0.5 / 0.75); lazy_streaming is lowest at 0.5 (3.977) and third at
0.75 (4.011, after rkv and observed_attention). Both sit at or just below the uncompressed 3.979 at 0.5, within
this model's noise. `composed` (knorm 0.5 then streaming_llm 0.5, its registry default) and `think` (key channels)
do not take the sweep's ratio, so their columns repeat; `composed` applies both ratios to the current cache after
every chunk, so its cache shrinks to a few dozen entries.

Token order (2026-11-26). kvpress 0.5.5 keeps the entries a scorer press selects in score order (kvpress issue
#173); a press that compresses the same cache again and reads the cache index as a token's age (StreamingLLM's
sinks and window, lagkv's partitions, SnapKV's pooling) then works on a shuffled cache. `EveryChunkPress` now runs
scorer presses through `TemporalOrderPress` (same entries, token order) and the registry does so inside
`ComposedPress`, `DecodingPress` and `PrefillDecodingPress`. Against the 2026-11-23 table the perplexities moved by
at most 0.004 for the scorer presses on this 512-token model (lagkv 3.9851 to 3.9837 at 0.25, knorm 4.1741 to
4.1703 at 0.5; random presses draw new numbers); `composed` went from 4.2718 to 4.1979 at its setting. On SmolLM2 at
a 4k context the same fix moved streaming_llm from +64 % to +3.4 % (`docs/results/longcontext.md`, part 2c).
`think` changed before this fix, between 2026-11-23 and 2026-11-25 (4.0896 with this morning's code too), and the
earlier table showed it at the uncompressed value.
Failures come from kvpress presses that assume one prefill with q_len == k_len (pyramidkv, chunkkv, block, adakv's
fake keys) or refuse anything but prefill (leverage_score, non_causal_attention, compactor); their plain-mode
behaviour (one prefill, no --ppl_apply_press) was not measured here.

{table}
![perplexity against ratio](perplexity_ratios.png)

![ranked at ratio 0.5](perplexity_r0.5.png)
"""



if __name__ == "__main__":
    sys.exit(main())
