#!/bin/bash
# The last call of the second lent-GPU session (on the same warm machine, after a call carrying .whl + .gguf1 that
# sources setup.sh, and one carrying .gguf2; the working tree grew, so the GGUF now needs three calls): what run_c.sh left
# of the long-context runs. The grids resume from the cells already committed under docs/results/data/longcontext_gpu/, so
# finished cells are skipped and every process adds samples; the 8k pass key (7,900 tokens) comes first.
# bash tools/device/run_d.sh   (carry: .gguf3 .shared)   BUDGET seconds for the jobs; the new cells go to $OUT
set -u
BUDGET=${BUDGET:-480}
START=$(date +%s)
SITE=${SITE:-/tmp/site}; . tools/device/setup.sh
RES=${RES:-/tmp/res}
DONE=docs/results/data/longcontext_gpu
mkdir -p $RES
smollm2_ready
echo "converted after $(( $(date +%s) - START )) s"
seed() {  # output dir, committed grid: start from its cells so finished ones are skipped
  mkdir -p $RES/$1/cells && touch $RES/$1/.kvpress-ext-results && cp $DONE/$2/cells/*.json $RES/$1/cells/
  # a cell is reused only if its parameters match, the haystack path included (run_c.sh ran in /work/main)
  sed -i "s#/work/main/.shared/#$PWD/.shared/#g" $RES/$1/cells/*.json
}
COMMON="--depths 0 0.5 1 0.25 0.75 --max_new_tokens 10 --threads 1 --no_progress"  # spread depths first if cut
N="$PY evaluation/needle.py"
run() {  # name, command...: one key per depth first, then three
  local name=$1; shift
  ( timeout $(left) "$@" --num_keys 1 --output_dir $RES/$name > $RES/$name.log 2>&1
    timeout $(left) "$@" --num_keys 3 --output_dir $RES/$name >> $RES/$name.log 2>&1
    echo "$name done rc=$? at $(( $(date +%s) - START )) s" >> $RES/$name.log ) &
}
RATIOS="--compression_ratio 0.5 0.25 0.75 0.1"
for M in agnostic aware; do  # 8k: 7,900 tokens of haystack, the longest that fits 8,192 positions with the prompt
  Q=$([ $M = aware ] && echo --query_aware)
  run passkey_7900_${M}_a $N --lengths 7900 $COMMON --press rkv snapkv tova knorm $RATIOS $Q
  run passkey_7900_${M}_b $N --lengths 7900 $COMMON --press streaming_llm lazy_streaming expected_attention pyramidkv \
    $RATIOS $Q
done
run a3_7900 $N --lengths 7900 $COMMON --strategies debug blend random attnlink surprisal_chunk cat full \
  --rate 0.15 0.05 0.3 1.0 --chunk_tokens 512
PRESSES="snapkv expected_attention tova knorm streaming_llm pyramidkv lazy_streaming rkv"
for L in 1024 2048 4096; do  # more samples where run_c.sh was cut off (1-5 per cell)
  for M in agnostic aware; do
    Q=$([ $M = aware ] && echo --query_aware)
    seed passkey_${L}_$M passkey
    run passkey_${L}_$M $N --lengths $L $COMMON --press $PRESSES --compression_ratio 0.1 0.25 0.5 0.75 $Q
  done
done
seed a3_topup a3
run a3_topup $N --lengths 1024 2048 4096 $COMMON --strategies blend debug attnlink surprisal_chunk cat full random \
  --rate 0.05 0.15 0.3 1.0 --chunk_tokens 512
seed multidoc_topup multidoc
( timeout $(left) $N --task multidoc --chunk_tokens 500 --lengths 8000 4000 2000 --depths 0 0.5 1 --max_new_tokens 10 \
    --threads 1 --no_progress --press $PRESSES --compression_ratio 0.25 0.5 \
    --strategies blend debug attnlink surprisal_chunk cat full random --rate 0.05 0.15 0.3 1.0 \
    --num_keys 2 --output_dir $RES/multidoc_topup > $RES/multidoc_topup.log 2>&1 ) &
# 2d: the cap-2048 reference run_c.sh stopped at 24,545 of 32,768 targets; eager (one forward per token)
S="$PY evaluation/streaming_quality.py --model smollm2-135m --tokens 32768"
# --max_seconds: a run that is cut still saves the prefix it computed
( timeout $(left) $S --cap_total 2048 --out_dir $RES/streaming_cap2048 --method reference --reference_stride 32 \
    --batch 32 --max_seconds $(( $(left) - 40 )) ) > $RES/streaming_cap2048.log 2>&1 &
for C in 1024 2048; do
  ( timeout $(left) $S --cap_total $C --out_dir $RES/streaming_eager$C --method eager --max_seconds $(( $(left) - 40 )) \
    ) > $RES/streaming_eager$C.log 2>&1 &
done
sleep 5; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
wait
echo "all jobs ended after $(( $(date +%s) - START )) s"
for f in $RES/*.log; do echo "== $f"; tail -n 2 $f; done
cd $RES && tar czf $OUT/longcontext_gpu2.tgz --exclude='*.png' . && ls -la $OUT
