# One-off: the attention rows with the default launch (the Mosaic forward on Hopper), then the GPU tests.
set -u
source experiments/gpu_env.sh
stamp bench_attention
timeout ${BENCH_S:-200} python3 -m experiments.bench_attention --seq_lens=32768,65536,131072 \
  --iters=5 --profile --out=$OUT/bench_attention > $OUT/bench_log.txt 2>&1
grep '"pass"' $OUT/bench_log.txt | cut -c1-260
grep -i 'error' $OUT/bench_log.txt | cut -c1-600 | tail -3
TESTS_S=${TESTS_S:-360} DECODE_S=0 ATTN_S=0 bash experiments/gpu_kernels.sh
