#!/usr/bin/env bash
# The multi-GPU scaling run in one device call (kind nvidia-h200-x2, or -x4): the ~100M config
# on one GPU, then data-parallel, fsdp and fsdp x tensor meshes over all of them; checkpoint
# restored on one GPU and on the CPU. Results: $OUT/multigpu_scaling.{json,md}, log
# $OUT/multigpu.txt. Run from the repo root on the GPU machine, with the missing wheels carried
# in .whl/ (README: "Running on a GPU"); extra arguments go to the binary.
#   bash experiments/gpu_multigpu.sh [--loss_steps=50 --timed_steps=60 ...]
set -uo pipefail
source experiments/gpu_env.sh  # also keeps NVLink multicast off
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m experiments.multigpu_scaling --config=configs/pretrain_100m.py \
    --workdir=/tmp/runs/multigpu --out="$OUT/multigpu_scaling" "$@" 2>&1 | tee "$OUT/multigpu.txt"
