"""``kvpress-ext generate``: generate text with any registered press, from a shell.

The prompt is prefilled through the press (in chunks of the press's ``prefill_chunk_size`` when it has
one, so ``lazy_streaming`` compacts while a prompt longer than its cap streams in), then tokens are
decoded one forward at a time inside :func:`~kvpress_ext.apply.apply_press`, for the phases the press
compresses in (:func:`~kvpress_ext.apply.compression_phases`). Greedy by default; nucleus sampling
with a seeded ``torch.Generator`` when ``--temperature`` > 0. The cache length is recorded after every
forward pass, so the reported peak is what the cache holds between passes (bounded by ``cap_total`` for
``lazy_streaming``, however many tokens are generated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, TextStreamer

from kvpress_ext.adapters import get_adapter
from kvpress_ext.apply import apply_press, compression_phases
from kvpress_ext.errors import KVPressExtError, PressParameterError
from kvpress_ext.evaluation.perplexity import cache_length
from kvpress_ext.evaluation.speed import peak_memory_bytes, reset_peak_memory, synchronize
from kvpress_ext.icl.workflow import sample_token
from kvpress_ext.presses.lazy_streaming import chunked_prefill


class GenerateInputError(KVPressExtError):
    """Bad ``generate`` input: missing model path, empty prompt, a sampling setting out of range."""


@dataclass
class Generation:
    """Generated token ids and what it cost (times in seconds, lengths in cache entries per layer)."""

    prompt_tokens: int
    generated_ids: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    cache_len_final: int = 0
    cache_len_peak: int = 0
    stopped_at_eos: bool = False

    @property
    def decode_tok_per_s(self) -> float:
        steps = len(self.generated_ids) - 1  # the first token comes from the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def eos_token_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


@contextmanager
def _record_cache_length(model, cache, result: Generation):
    """Record the cache length after each forward pass (registered last, so after any compaction)."""

    def hook(module, args, kwargs, output):
        result.cache_len_peak = max(result.cache_len_peak, cache_length(cache))

    handle = get_adapter(model).decoder(model).register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, press=None, *, max_new_tokens: int = 100, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, stop_at_eos: bool = True,
                 on_token=None, progress: bool = False) -> Generation:
    """Prefill ``input_ids`` (1 x n) through ``press`` and decode up to ``max_new_tokens`` tokens.

    ``on_token(id)`` is called for every new token as it is produced (for streaming). With ``stop_at_eos``
    generation ends after an EOS token (included in the ids, as ``model.generate`` does).
    """
    device = input_ids.device
    prefill_phase, decoding_phase = compression_phases(press)
    chunk = getattr(press, "prefill_chunk_size", None) if prefill_phase else None
    eos = eos_token_ids(model) if stop_at_eos else set()
    cache = DynamicCache()
    result = Generation(prompt_tokens=int(input_ids.shape[1]))

    def take(logits):
        token = sample_token(logits[0, -1], temperature, top_p, generator)
        result.generated_ids.append(token)
        if on_token is not None:
            on_token(token)
        bar.update(1)
        return token

    bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress, leave=False)
    synchronize(device)
    t0 = time.perf_counter()
    with apply_press(press if prefill_phase else None, model), _record_cache_length(model, cache, result):
        out = chunked_prefill(model, input_ids, cache, chunk or input_ids.shape[1])
        token = take(out.logits)
    synchronize(device)
    result.ttft_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    with apply_press(press if decoding_phase else None, model), _record_cache_length(model, cache, result):
        while len(result.generated_ids) < max_new_tokens and token not in eos:
            out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, logits_to_keep=1)
            token = take(out.logits)
    synchronize(device)
    result.decode_s = time.perf_counter() - t1
    bar.close()
    result.stopped_at_eos = token in eos
    result.cache_len_final = cache_length(cache)
    return result


# ---- command line ------------------------------------------------------------------------------------

def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise GenerateInputError(f"--prompt_file {str(path)!r} does not exist: pass an existing UTF-8 text file.")
        text = path.read_text(encoding="utf-8")
    else:
        text = args.prompt
    if not text.strip():
        raise GenerateInputError("The prompt is empty: pass --prompt TEXT or a non-empty --prompt_file FILE.")
    return text


def _check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise GenerateInputError(f"--max_new_tokens must be a positive integer, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise GenerateInputError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise GenerateInputError(f"--top_p must be in (0, 1], got {args.top_p}.")
    model = Path(args.model).expanduser()
    looks_like_path = args.model.startswith((".", "/", "~")) or args.model.count("/") > 1
    if looks_like_path and not model.is_dir():
        raise GenerateInputError(
            f"Model directory {args.model!r} does not exist: pass --model a local model directory "
            "(e.g. ../shared/models/stories260k) or a cached hub id."
        )


def _build_press(args):
    from kvpress_ext.evaluation.run_perplexity import parse_press_kwargs
    from kvpress_ext.registry import get_press

    kwargs = parse_press_kwargs(args.press_kwargs)
    if args.press is None:
        if kwargs:
            raise PressParameterError("--press_kwargs needs --press NAME (run `kvpress-ext list` for the names).")
        return None
    return get_press(args.press, **kwargs)


def _summary(result: Generation, memory: dict) -> str:
    mem = memory["peak_memory_bytes"] / 2**20
    kind = "peak RSS" if memory["peak_memory_kind"] == "cpu_peak_rss" else "peak CUDA memory"
    return (f"[prompt {result.prompt_tokens} tok | generated {len(result.generated_ids)} tok | "
            f"TTFT {result.ttft_s * 1000:.1f} ms | decode {result.decode_tok_per_s:.1f} tok/s | "
            f"cache {result.cache_len_final} final, {result.cache_len_peak} peak | {kind} {mem:.0f} MiB]")


def _cmd_generate(args) -> int:
    from kvpress_ext.evaluation.run_perplexity import load_model, press_params
    from kvpress_ext.registry import press_name

    _check_args(args)
    prompt = _read_prompt(args)
    press = _build_press(args)  # before loading the model: bad names/kwargs fail fast
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, tokenizer = load_model(args)
    device = next(model.parameters()).device
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    if input_ids.shape[1] == 0:
        raise GenerateInputError("The prompt tokenizes to no tokens: pass a longer --prompt.")
    generator = torch.Generator(device=device).manual_seed(args.seed)

    # transformers' own streamer: prints whole words as they complete (never half a multi-byte character)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if args.stream else None

    def on_token(token: int) -> None:
        streamer.put(torch.tensor([token]))

    reset_peak_memory(device)
    try:
        result = generate_ids(model, input_ids, press, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, generator=generator,
                              stop_at_eos=args.stop_at_eos, on_token=on_token if args.stream else None,
                              progress=not (args.stream or args.no_progress))
    except AssertionError as exc:  # kvpress presses assert on the attention implementation
        text = str(exc).lower()
        if "attention" not in text and "eager" not in text:
            raise  # another input problem: the press's own message (a PressInputError) says what to change
        other = "eager" if model.config._attn_implementation != "eager" else "sdpa"
        raise GenerateInputError(
            f"{args.press} cannot run here ({str(exc).strip() or 'assertion failed'}); "
            f"try --attn_implementation {other}."
        ) from exc
    text = tokenizer.decode(result.generated_ids, skip_special_tokens=True)
    if args.stream:
        streamer.end()  # the rest of the text and a newline
    else:
        print(text)
    memory = peak_memory_bytes(device)
    print(_summary(result, memory), file=sys.stderr)
    if args.json:
        record = {
            "model": args.model, "press": press_name(press) if press is not None else None,
            "press_params": press_params(press), "device": str(device),
            "prompt": prompt, "text": text, "generated_ids": result.generated_ids,
            "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.generated_ids),
            "ttft_s": result.ttft_s, "decode_s": result.decode_s, "decode_tok_per_s": result.decode_tok_per_s,
            "cache_len_final": result.cache_len_final, "cache_len_peak": result.cache_len_peak,
            "stopped_at_eos": result.stopped_at_eos, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, **memory,
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with any registered press (greedy or sampled, optionally streamed)",
        description="Prefill a prompt through a press and decode token by token; prints the text, then one line "
                    "of statistics on stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local model directory or cached hub id")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt_file", help="UTF-8 file holding the prompt")
    p.add_argument("--press", default=None, help="registered press name (default: no compression)")
    p.add_argument("--press_kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="press parameters (int/float/bool/none/str values)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", default=None, metavar="OUT", help="write the text and statistics to this JSON file")
    p.add_argument("--stop_at_eos", dest="stop_at_eos", action="store_true", default=True,
                   help="stop after an end-of-sequence token")
    p.add_argument("--no_stop_at_eos", dest="stop_at_eos", action="store_false",
                   help="keep generating past end-of-sequence tokens")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--attn_implementation", default="sdpa", choices=("eager", "sdpa", "flash_attention_2"))
    p.add_argument("--num_threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_generate)
