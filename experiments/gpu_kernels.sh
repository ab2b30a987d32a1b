#!/bin/bash
# One device call: the GPU tests and the kernel benchmarks. Their files end up in one archive,
# $OUT/gpu_kernels.tgz (a device call returns at most 8 files; these are about 10).
#   bash experiments/gpu_kernels.sh   (on the GPU machine, from the repo root, .whl carried)
# Each step has a time limit (seconds, 0 skips it): TESTS_S, DECODE_S, ATTN_S, TOPK_S, FFN_S.
# TOPK_S defaults to 0 since 2026-12-06 (4 warps per row measured fastest, the default).
# The whole GPU suite needs more than 220 s (cut there twice on 2026-12-06), so the defaults
# exceed one call's 600 s: run the tests alone (DECODE_S=0 ATTN_S=0), then the rest (TESTS_S=0).
set -u
source experiments/gpu_env.sh
if runs ${TESTS_S:-450}; then
  stamp "gpu tests ${TEST_FILES:-tests/gpu}"
  timeout ${TESTS_S:-450} python3 -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests/gpu} 2>&1 \
    | grep -v "Warning\|^  " | tail -30 > "$OUT/gpu_tests.txt"
  tail -8 "$OUT/gpu_tests.txt"
fi
if runs ${DECODE_S:-200}; then
  # XLA's selection keys and the decode kernels' (attention_options decode_keys_kernel, the
  # default) at their default splits (about 4 programs per SM; traced), at 2 per SM, and with
  # the coarse normaliser (--approximate_lse, a quarter of its reads), each timed in-step.
  for variant in nokeys:--nokeys_kernel keys:--profile keys_splits16:--keys_splits=16 \
                 keys_coarse_lse:--approximate_lse; do
    name=${variant%%:*}; args=${variant#*:}
    stamp "bench_decode $args"
    timeout $(( ${DECODE_S:-200} / 4 )) python3 -m experiments.bench_decode \
      --seq_lens=${DECODE_LENS:-32768,131072} --batch=8 --configs=issue $args \
      --out="$OUT/bench_decode_$name" 2>&1 | grep '^{' | cut -c1-500
  done
fi
if runs ${ATTN_S:-300}; then
  # The sweep first (tile tokens, scoring options, launches, dk/dv work items; 1000000 is one
  # program per key block, the schedule before 2026-12-06: 118 ms against 91 at 1024) at 64k,
  # then the rows at the best, with each row's kernels traced.
  stamp "bench_attention --tune"
  timeout ${ATTN_S:-300} python3 -m experiments.bench_attention --tune --tune_seq_len=65536 \
    --tune_block_q=${TUNE_BLOCK_Q:-1,2,4} \
    --tune_score_grid="block_rows=128|256,block_windows=64,num_warps=4|8" \
    --tune_launch_grid=4x2,4x3 --tune_dkdv_chunk=${TUNE_DKDV_CHUNK:-256,1024,4096,1000000} \
    --seq_lens=${SEQ_LENS:-32768,131072} --passes=fwd,fwd_bwd \
    --iters=3 --profile --out="$OUT/bench_attention" 2>&1 | grep '^{' | cut -c1-400
fi
if runs ${TOPK_S:-0}; then
  stamp "bench_topk, warps per row"
  timeout ${TOPK_S} python3 -m experiments.bench_topk --seq_lens=131072 --num_warps=1,2,4,8 \
    --out="$OUT/bench_topk_warps" 2>&1 | grep '^{' | cut -c1-300
fi
if runs ${FFN_S:-0}; then
  stamp "bench_ffn"
  timeout ${FFN_S} python3 -m experiments.bench_ffn --out="$OUT/bench_ffn" 2>&1 | grep -v Warn \
    | tail -6
fi
# Archived outside $OUT (tar of a folder it writes into fails), then moved in.
(cd "$OUT" && tar czf /tmp/gpu_kernels.tgz . && find . -type f -delete \
  && mv /tmp/gpu_kernels.tgz .)
stamp "done: $OUT/gpu_kernels.tgz"
