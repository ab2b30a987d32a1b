#!/bin/bash
# One device call: NOSA's GPU tests (the biased block-sparse kernels and the layer), its prefill
# benchmark against InfLLM-V2 and cuDNN dense, and the offloaded decode against the in-HBM one.
#   bash experiments/gpu_nosa.sh   (on the GPU machine, from the repo root, .whl carried)
# Step time limits (seconds, 0 skips): TESTS_S, BENCH_S, OFFLOAD_S. The new GPU test of the
# biased attention (test_sparse_attention_gpu.py::test_key_bias_matches_reference) alone took
# 256 s on the H100 (2026-12-08), the whole file more than 600 s: the default runs
# tests/gpu/test_nosa_gpu.py only.
set -u
source experiments/gpu_env.sh
if runs ${TESTS_S:-200}; then
  stamp "gpu tests ${TEST_FILES:-tests/gpu/test_nosa_gpu.py}"
  timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider \
    ${TEST_FILES:-tests/gpu/test_nosa_gpu.py} 2>&1 \
    | grep -v "Warning\|^  " | tail -30 > "$OUT/gpu_tests_nosa.txt"
  tail -8 "$OUT/gpu_tests_nosa.txt"
fi
if runs ${BENCH_S:-240}; then
  stamp "bench_nosa"
  timeout ${BENCH_S:-240} python3 -m experiments.bench_nosa --seq_lens=${SEQ_LENS:-32768,65536} \
    --iters=5 --out="$OUT/bench_nosa" 2>&1 | grep '^{' | cut -c1-900
fi
if runs ${OFFLOAD_S:-150}; then
  stamp "bench_offload"
  timeout ${OFFLOAD_S:-150} python3 -m experiments.bench_offload --capacity=131072 --batch=8 \
    --out="$OUT/bench_offload" 2>&1 | grep '^{' | cut -c1-600
fi
stamp done
