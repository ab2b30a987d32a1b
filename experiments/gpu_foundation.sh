#!/usr/bin/env bash
# The foundation's GPU checks in one device call: cuDNN packed attention tests, then the ~100M
# pretraining throughput run and its report. Run from the repo root on the GPU machine, with
# the missing wheels carried in .whl/ (README: "Running on a GPU").
set -uo pipefail
source experiments/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  python3 -m pytest -q tests/gpu > "$OUT/gpu_tests.txt" 2>&1; tail -8 "$OUT/gpu_tests.txt"
fi
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,utilization.gpu --format=csv -l 3 > "$OUT/gpu_monitor.csv" &
MONITOR=$!
CMD="python3 -m experiments.pretrain --config=configs/pretrain_100m.py --config.workdir=/tmp/runs/pretrain_100m --config.resume=False"
$CMD "$@" 2>&1 | tr '\r' '\n' | grep -v "^train:" | tail -30 | tee "$OUT/pretrain.txt"
python3 -m experiments.throughput_report --config=configs/pretrain_100m.py \
    --workdir=/tmp/runs/pretrain_100m --out="$OUT/pretrain_throughput" --command="$CMD $*"
kill $MONITOR
cp /tmp/runs/pretrain_100m/logs/train_metrics.csv "$OUT/pretrain_train_metrics.csv"
