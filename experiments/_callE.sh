# One-off: the Mosaic GPU forward probe and its GPU tests, then branch rank-keys' A/B (_callD.sh).
set -u
source experiments/gpu_env.sh
stamp probe
timeout ${PROBE_S:-170} python3 -m experiments._mosaic_probe ${PROBE_SEQS:-32768 131072} > $OUT/probe.txt 2>&1
grep -v '^ \|^Traceback' $OUT/probe.txt | cut -c1-700 | tail -40
stamp mosaic_tests
timeout ${MTESTS_S:-80} python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_sparse_attention_gpu.py -k mosaic > $OUT/mosaic_tests.txt 2>&1
tail -30 $OUT/mosaic_tests.txt | cut -c1-400
runs ${AB_S:-1} && bash experiments/_callD.sh
