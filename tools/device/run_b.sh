#!/bin/bash
# Call 1 on the lent GPU: install the wheels, keep the GGUF's first part, GPU benchmarks on random weights.
# bash tools/device/run_b.sh   (carry: .whl .gguf1)   writes into $OUT
set -u
. tools/device/setup.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch, transformers, kvpress, kvpress_ext; print('torch', torch.__version__, 'transformers', transformers.__version__, 'kvpress ok')" 2>&1 | tee -a $OUT/device.txt
nproc | tee -a $OUT/device.txt
timeout 60 python3 benchmarks/gpu_checks.py --json $OUT/gpu_checks.json > $OUT/gpu_checks.log 2>&1; echo "gpu_checks rc=$?" | tee -a $OUT/device.txt
tail -3 $OUT/gpu_checks.log
timeout 70 python3 benchmarks/a3_ttft.py --device cuda --layers 16 --dtype bfloat16 --lengths 2048 4096 8192 \
  --repeat 3 --out $OUT/a3_ttft_gpu.json 2>&1 | tee $OUT/a3_ttft.log | grep -v Warn
timeout 110 python3 benchmarks/rkv_throughput.py --device cuda --tokens 4096 --batches 8 --budgets 512 \
  --output $OUT/rkv_throughput_gpu.json > $OUT/rkv_throughput.log 2>&1; echo "rkv_throughput rc=$?"
tail -12 $OUT/rkv_throughput.log
wait
ls -la /tmp/gguf.part0
