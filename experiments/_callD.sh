# One-off A/B of branch rank-keys (on one-sort) in one device call, fwd and fwd_bwd at 32k and
# 128k with --profile: the tree (the scoring kernel writes the ranking keys; the transposed
# index is one 1D sort), the tree with dQ from the dk/dv kernel's atomics (fwd_bwd only), then
# one_sort (main's block scoring back), then main (main's index too). The main files are in
# experiments/_baseline/. About 4 minutes; TESTS_S=300 adds the GPU tests of what changed.
set -u
source experiments/gpu_env.sh
save=/tmp/tree_files; mkdir -p $save
cp pallas_kernels/sparse_attention/index.py pallas_kernels/block_scores/op.py \
   pallas_kernels/block_scores/kernel.py $save/
for variant in ${VARIANTS:-rank_keys dq_atomic one_sort main}; do
  launch=; passes=${PASSES:-fwd,fwd_bwd}
  [ $variant = dq_atomic ] && launch=dq_atomic=1 && passes=fwd_bwd
  [ $variant = mosaic ] && launch=forward_kernel=mosaic
  if [ $variant = one_sort ] || [ $variant = main ]; then
    cp experiments/_baseline/block_scores_op.py pallas_kernels/block_scores/op.py
    cp experiments/_baseline/block_scores_kernel.py pallas_kernels/block_scores/kernel.py
  fi
  if [ $variant = main ]; then  # main's index, plus the Mosaic forward's union_token_bits
    { sed 's/^import jax.numpy as jnp$/import jax.numpy as jnp\nfrom jax import lax/' \
        experiments/_baseline/index.py; echo; echo; sed -n '/^def union_token_bits/,$p' $save/index.py; } \
      > pallas_kernels/sparse_attention/index.py
  fi
  stamp "$variant"
  timeout ${LIMIT_S:-80} python3 -m experiments.bench_attention --seq_lens=32768,131072 \
    --passes=$passes --launch="$launch" --iters=3 ${PROFILE---profile} --out=$OUT/ab_$variant 2>&1 \
    | grep '"pass"' | cut -c1-160
done
cp $save/index.py pallas_kernels/sparse_attention/index.py
cp $save/op.py $save/kernel.py pallas_kernels/block_scores/
if runs ${TESTS_S:-0}; then
  stamp tests
  timeout $TESTS_S python3 -m pytest -q -p no:cacheprovider tests/gpu/test_block_scores_gpu.py \
    tests/gpu/test_sparse_attention_gpu.py 2>&1 | tail -2
fi
(cd "$OUT" && tar czf /tmp/d.tgz . && find . -type f -delete && mv /tmp/d.tgz .)  # <= 8 files
stamp done
