"""``kvpress-ext generate``: generate text with any registered press, from a shell (over :mod:`kvpress_ext.runtime.generate`)."""

from __future__ import annotations

import json
import sys

import torch
from transformers import TextStreamer

from kvpress_ext.cli.common import (
    DefaultsHelpFormatter,
    add_model_argument,
    add_placement_args,
    add_threads_argument,
    parse_press_kwargs,
    placement_kwargs,
    seed_int,
    set_threads,
)
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.registry import get_press, press_name
from kvpress_ext.evaluation.press_setup import press_params
from kvpress_ext.evaluation.results import machine_load
from kvpress_ext.evaluation.speed import peak_memory_bytes, reset_peak_memory
from kvpress_ext.runtime import hub
from kvpress_ext.runtime.chat import split_chat_prompt
from kvpress_ext.runtime.generate import GenerateInputError, Generation, generate_ids, generate_many
from kvpress_ext.runtime.models import load_model, other_attention
from kvpress_ext.runtime.threads import threads_text
from kvpress_ext.storage.inputs import read_text_file
from kvpress_ext.storage.safe_write import check_output_file, write_output


def _read_prompts(args) -> list[str]:
    texts = [read_text_file(args.prompt_file, "--prompt_file")] if args.prompt_file is not None else args.prompt
    for i, text in enumerate(texts, 1):
        if not text.strip():
            which = f"Prompt {i} of {len(texts)}" if len(texts) > 1 else "The prompt"
            raise GenerateInputError(f"{which} is empty: pass --prompt TEXT or a non-empty --prompt_file FILE.")
    if len(texts) > 1 and (args.temperature > 0 or args.stream):
        raise GenerateInputError("Several prompts are decoded greedily and printed at the end: leave out "
                                 "--temperature and --stream, or pass one --prompt.")
    return texts


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise GenerateInputError(f"--batch_size must be a positive integer, got {args.batch_size}.")
    if args.prefill_chunk_size is not None and args.prefill_chunk_size < 1:
        raise GenerateInputError(f"--prefill_chunk_size must be a positive integer, got {args.prefill_chunk_size}.")
    if args.max_new_tokens < 1:
        raise GenerateInputError(f"--max_new_tokens must be a positive integer, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise GenerateInputError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}.")
    if args.temperature != 0 and not 1e-3 <= args.temperature <= 1e3:  # NaN, inf, 1e-300 (logits / t overflow)
        raise GenerateInputError(f"--temperature must be 0 (greedy) or in [0.001, 1000], got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise GenerateInputError(f"--top_p must be in (0, 1], got {args.top_p}.")
    if args.json:
        check_output_file(args.json)


def _build_press(args):
    kwargs = parse_press_kwargs(args.press_kwargs)
    if args.press is None:
        if kwargs:
            raise PressParameterError("--press_kwargs needs --press NAME (run `kvpress-ext list` for the names).")
        return None
    if args.press == "a3":  # it fuses stored chunk caches: over one prompt it would compress nothing
        raise PressParameterError("--press a3 fuses stored chunks with a question: run `kvpress-ext a3 ask --chunks "
                                  "FILE --question TEXT`, or choose a press that compresses one prompt.")
    return get_press(args.press, **kwargs)


def _summary(result: Generation, memory: dict, threads: int, device) -> str:
    mem = memory["peak_memory_bytes"] / 2**20
    kind = "peak RSS" if memory["peak_memory_kind"] == "cpu_peak_rss" else "peak CUDA memory"
    where = threads_text(threads) if torch.device(device).type == "cpu" else str(device)
    return (f"[prompt {result.prompt_tokens} tok | generated {len(result.generated_ids)} tok | "
            f"TTFT {result.ttft_s * 1000:.1f} ms | decode {result.decode_tok_per_s:.1f} tok/s on {where} | "
            f"cache {result.cache_len_final} final, {result.cache_len_peak} peak (entries per layer) | "
            f"{kind} {mem:.0f} MiB]")


def _cmd_generate(args) -> int:
    _check_args(args)
    prompts = _read_prompts(args)
    press = _build_press(args)  # before loading the model: bad names/kwargs fail fast
    threads = set_threads(args.threads)
    load_start = machine_load()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  attn_implementation=args.attn_implementation, **placement_kwargs(args))
    device = input_device(model)
    if len(prompts) > 1:
        return _generate_several(args, model, tokenizer, prompts, press)
    prompt = prompts[0]
    chat = split_chat_prompt(tokenizer, prompt, use_chat_template=args.use_chat_template)
    if chat.templated:  # the template writes its own special tokens
        input_ids = tokenizer(chat.text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    else:
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
        with hub.explain_press_failures(args.press):  # a press needing hub files offline: one line, at once
            result = generate_ids(model, input_ids, press, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, generator=generator,
                                  stop_at_eos=args.stop_at_eos, on_token=on_token if args.stream else None,
                                  progress=not (args.stream or args.no_progress),
                                  prefill_chunk_size=args.prefill_chunk_size)
    except AssertionError as exc:  # kvpress presses assert on the attention implementation
        other = other_attention(model, exc)
        if other is None:
            raise  # another input problem: the press's own message (a PressInputError) says what to change
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
    if args.json:  # written before the statistics line, so a failed write leaves its error as stderr's one line
        record = {
            "model": args.model, "press": press_name(press) if press is not None else None,
            "press_params": press_params(press), "device": str(device),
            "prompt": prompt, "chat_template": chat.templated, "text": text, "generated_ids": result.generated_ids,
            "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.generated_ids),
            "ttft_s": result.ttft_s, "decode_s": result.decode_s, "decode_tok_per_s": result.decode_tok_per_s,
            "cache_len_final": result.cache_len_final, "cache_len_peak": result.cache_len_peak,
            "stopped_at_eos": result.stopped_at_eos, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "threads": threads,
            "load_start": load_start, "load_end": machine_load(), **memory,
        }
        write_output(args.json, json.dumps(record, indent=2))
    print(_summary(result, memory, threads, device), file=sys.stderr)
    return 0


def _prompt_ids(tokenizer, prompt: str, use_chat_template) -> list[int]:
    chat = split_chat_prompt(tokenizer, prompt, use_chat_template=use_chat_template)
    if chat.templated:  # the template writes its own special tokens
        return tokenizer(chat.text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _generate_several(args, model, tokenizer, prompts, press) -> int:
    """Several ``--prompt``: greedy, ``--batch_size`` at a time in left-padded batches; one text per prompt."""
    ids = [_prompt_ids(tokenizer, p, args.use_chat_template) for p in prompts]
    with hub.explain_press_failures(args.press):
        results = generate_many(model, ids, press, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                stop_at_eos=args.stop_at_eos, prefill_chunk_size=args.prefill_chunk_size)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in results]
    for i, text in enumerate(texts, 1):
        print(f"--- prompt {i} ---\n{text}")
    if args.json:
        record = {"model": args.model, "press": press_name(press) if press is not None else None,
                  "prompts": prompts, "texts": texts, "generated_ids": results, "batch_size": args.batch_size,
                  "prefill_chunk_size": args.prefill_chunk_size, "max_new_tokens": args.max_new_tokens}
        write_output(args.json, json.dumps(record, indent=2))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with any registered press (greedy or sampled, optionally streamed)",
        description="Prefill a prompt through a press and decode token by token; prints the text, then one line "
                    "of statistics on stderr. A model with a chat template gets the prompt as the user's turn.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_model_argument(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append",
                        help="prompt text; repeat for several prompts (greedy, run --batch_size at a time)")
    prompt.add_argument("--prompt_file", help="UTF-8 file holding the prompt")
    p.add_argument("--press", default=None, help="registered press name (default: no compression)")
    p.add_argument("--press_kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="press parameters (int/float/bool/none/str values)")
    p.add_argument("--max_new_tokens", type=int, default=100, help="most tokens to generate")
    p.add_argument("--batch_size", type=int, default=1,
                   help="prompts per left-padded batch (each compressed as if alone; presses that cannot refuse)")
    p.add_argument("--prefill_chunk_size", type=int, default=None,
                   help="feed the prompt in chunks of this many tokens, compressing after each (default: one pass)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampling generator")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", default=None, metavar="OUT", help="write the text and statistics to this JSON file (missing directories are created; an existing "
                        "file is replaced atomically only if it holds JSON)")
    p.add_argument("--stop_at_eos", dest="stop_at_eos", action="store_true", default=True,
                   help="stop after an end-of-sequence token")
    p.add_argument("--no_stop_at_eos", dest="stop_at_eos", action="store_false",
                   help="keep generating past end-of-sequence tokens")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_placement_args(p)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="model weights' dtype (auto: as saved)")
    p.add_argument("--attn_implementation", default="sdpa", choices=("eager", "sdpa", "flash_attention_2"),
                   help="attention kernel (some presses need eager attention weights)")
    add_threads_argument(p, "--num_threads")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_generate)
