#!/bin/bash
# One device call: every GPU test and the kernel benchmarks, results under $OUT.
#   bash experiments/gpu_kernels.sh   (on the GPU machine, from the repo root, .whl carried)
set -u
source experiments/gpu_env.sh
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
stamp "gpu tests"
timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu ${TEST_ARGS:-} 2>&1 \
  | grep -v "Warning\|warn\|^  " | tail -30 > "$OUT/gpu_tests.txt"
tail -8 "$OUT/gpu_tests.txt"
stamp "bench_ffn"
timeout ${FFN_S:-120} python3 -m experiments.bench_ffn --out="$OUT/bench_ffn" 2>&1 | grep -v Warn | tail -6
if [ -f experiments/bench_decode.py ]; then
  stamp "bench_decode"
  timeout ${DECODE_S:-90} python3 -m experiments.bench_decode --seq_lens=${DECODE_LENS:-32768,131072} \
    --batch=8 --out="$OUT/bench_decode" 2>&1 \
    | grep -v Warn | tail -6
fi
stamp "bench_attention"
timeout ${ATTN_S:-240} python3 -m experiments.bench_attention --seq_lens=${SEQ_LENS:-32768,131072} \
  --passes=${PASSES:-attn_only,fwd,fwd_bwd} --iters=5 --out="$OUT/bench_attention" 2>&1 \
  | grep '^{' | cut -c1-600
stamp "bench_attention block_q 16"
timeout ${ATTN16_S:-60} python3 -m experiments.bench_attention --seq_lens=131072 --passes=fwd \
  --attn_block_q=16 --iters=3 --out="$OUT/bench_attention_bq16" 2>&1 | grep '^{' | cut -c1-400
stamp done
