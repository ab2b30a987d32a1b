# One-off A/B: the transposed index as one 1D sort (the tree) against the batched sort (baseline).
set -u
source experiments/gpu_env.sh
f=pallas_kernels/sparse_attention/index.py
cp $f /tmp/index_new.py
for variant in one_sort batched; do
  [ $variant = batched ] && cp experiments/_baseline_index.py $f
  stamp "$variant"
  timeout ${LIMIT_S:-100} python3 -m experiments.bench_attention --seq_lens=32768,131072 \
    --passes=fwd_bwd --iters=3 --profile --out=$OUT/ab_index_$variant 2>&1 | grep '"pass"' | cut -c1-160
done
cp /tmp/index_new.py $f
stamp done
