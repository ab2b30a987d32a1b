#!/usr/bin/env bash
# The multi-GPU scaling run in one device call (kind nvidia-h200-x2, or -x4): the ~100M config
# on one GPU, then data-parallel, fsdp and fsdp x tensor meshes over all of them; checkpoint
# restored on one GPU and on the CPU. Results: $OUT/multigpu_scaling.{json,md}, log
# $OUT/multigpu.txt. Run from the repo root on the GPU machine, with the missing wheels carried
# in .whl/ (README: "Running on a GPU"); extra arguments go to the binary.
#   bash experiments/gpu_multigpu.sh [--loss_steps=50 --timed_steps=30 ...]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM: on these shared hosts a program that
# uses it can put the GPUs out of service for a day or more.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m experiments.multigpu_scaling --config=configs/pretrain_100m.py \
    --workdir=/tmp/runs/multigpu --out="$OUT/multigpu_scaling" "$@" 2>&1 | tee "$OUT/multigpu.txt"
