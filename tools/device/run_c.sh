#!/bin/bash
# Call 2 on the same warm GPU machine: SmolLM2 from the two GGUF parts, then the long-context runs as
# parallel processes (one per length x mode, each resumable), bounded by BUDGET seconds; the cells go to $OUT.
# bash tools/device/run_c.sh   (carry: .gguf2 .shared)
set -u
BUDGET=${BUDGET:-380}
START=$(date +%s)
SITE=${SITE:-/tmp/site}; . tools/device/setup.sh
RES=${RES:-/tmp/res}
mkdir -p $RES
smollm2_ready
echo "converted after $(( $(date +%s) - START )) s"
PRESSES="snapkv expected_attention tova knorm streaming_llm pyramidkv lazy_streaming rkv"
COMMON="--depths 0 0.25 0.5 0.75 1 --max_new_tokens 10 --threads 1 --no_progress"
N="$PY evaluation/needle.py"
run() {  # name, command...: one key per depth first, then three (the second run skips the finished cells)
  local name=$1; shift
  ( timeout $(left) "$@" --num_keys 1 --output_dir $RES/$name > $RES/$name.log 2>&1
    timeout $(left) "$@" --num_keys 3 --output_dir $RES/$name >> $RES/$name.log 2>&1
    echo "$name done rc=$? at $(( $(date +%s) - START )) s" >> $RES/$name.log ) &
}
for L in ${LENGTHS:-1024 2048 4096 7900}; do  # 8k: the longest haystack that fits 8,192 positions with the prompt (7,980)
  run passkey_${L}_agnostic $N --lengths $L $COMMON --press $PRESSES --compression_ratio 0.1 0.25 0.5 0.75
  run passkey_${L}_aware $N --lengths $L $COMMON --press $PRESSES --compression_ratio 0.1 0.25 0.5 0.75 --query_aware
  run a3_${L} $N --lengths $L $COMMON --strategies blend debug attnlink surprisal_chunk cat full random \
    --rate 0.05 0.15 0.3 1.0 --chunk_tokens 512
done
for L in 2000 4000 8000; do  # 2b multi-document QA: documents of 500 tokens (16 x 512 would pass 8,192 positions)
  run multidoc_${L} $N --task multidoc --chunk_tokens 500 --lengths $L --depths 0 0.5 1 --max_new_tokens 10 \
    --threads 1 --no_progress --press $PRESSES --compression_ratio 0.25 0.5 \
    --strategies blend debug attnlink surprisal_chunk cat full random --rate 0.05 0.15 0.3 1.0
done
P="$PY evaluation/perplexity.py --context_limit 4096 --max_eval_tokens 8192 --press all --compression_ratio 0.25 0.5 0.75 \
   --decode_chunk_size 8 --no_speed --threads 1 --no_progress --dataset text"
for T in pride_and_prejudice.txt wikitext2_test.raw; do  # 2c perplexity at a 4k context, plain and incremental
  ( timeout $(left) $P --text_file .shared/data/$T --no_ppl_press --output_dir $RES/ppl4k_${T%%.*}_plain > $RES/ppl4k_${T%%.*}_plain.log 2>&1 ) &
  ( timeout $(left) $P --text_file .shared/data/$T --ppl_apply_press --output_dir $RES/ppl4k_${T%%.*}_incremental \
      > $RES/ppl4k_${T%%.*}_incremental.log 2>&1 ) &
done
G="$PY evaluation/long_generation.py --threads 1 --no_progress --budgets 256 512 1024"
( timeout $(left) $G --part nll --methods full rkv --max_seconds $(( $(left) - 40 )) --output_dir $RES/longgen_nll_rkv \
    > $RES/longgen_nll_rkv.log 2>&1 ) &
( timeout $(left) $G --part nll --methods full lazy_streaming decoding_snapkv decoding_streaming_llm \
    --max_seconds $(( $(left) - 40 )) --output_dir $RES/longgen_nll_others > $RES/longgen_nll_others.log 2>&1 ) &
( timeout $(left) $G --part gen --gen_tokens 1000 --max_seconds $(( $(left) - 40 )) --output_dir $RES/longgen_gen \
    > $RES/longgen_gen.log 2>&1 ) &
for C in 1024 2048; do  # 2d: 32k tokens of Pride and Prejudice + essays, past the 8k trained context
  S="$PY evaluation/streaming_quality.py --model smollm2-135m --cap_total $C --out_dir $RES/streaming_cap$C"
  ( for m in lazy dense; do timeout $(left) $S --tokens 32768 --method $m; done
    timeout $(left) $S --tokens 32768 --method reference --reference_stride 32 --batch 32
    timeout $(left) $S --tokens 4096 --method eager ) > $RES/streaming_cap$C.log 2>&1 &
done
sleep 5; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
wait
echo "all jobs ended after $(( $(date +%s) - START )) s"
for f in $RES/*.log; do echo "== $f"; tail -2 $f; done
ls $RES/*/cells 2>/dev/null | head -0
cd $RES && tar czf $OUT/longcontext_gpu.tgz --exclude='*.png' . && ls -la $OUT
