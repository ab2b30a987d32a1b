# One-off: the Mosaic forward's times (probe), then the tree's bench rows (rank_keys, mosaic) with
# their errors kept.
set -u
source experiments/gpu_env.sh
stamp probe
timeout ${PROBE_S:-150} python3 -m experiments._mosaic_probe ${PROBE_SEQS:-32768 131072} > $OUT/probe.txt 2>&1
grep -v '^ \|^Traceback' $OUT/probe.txt | cut -c1-600 | tail -30
for variant in ${VARIANTS:-rank_keys mosaic}; do
  launch=
  [ $variant = mosaic ] && launch=forward_kernel=mosaic
  stamp "$variant"
  timeout ${LIMIT_S:-80} python3 -m experiments.bench_attention --seq_lens=32768,131072 \
    --passes=fwd,fwd_bwd --launch="$launch" --iters=3 --profile --out=$OUT/ab_$variant \
    > $OUT/log_$variant.txt 2>&1
  grep '"pass"' $OUT/log_$variant.txt | cut -c1-200
  grep -v '^ \|"pass"' $OUT/log_$variant.txt | grep -i 'error\|exception' | cut -c1-800 | tail -4
done
(cd "$OUT" && tar czf /tmp/d.tgz . && find . -type f -delete && mv /tmp/d.tgz .)  # <= 8 files
stamp done
