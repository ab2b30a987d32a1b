# Sourced by the experiments/gpu_*.sh scripts (from the repo root on the GPU machine): installs
# the wheels the GPU image lacks (carried in .whl/, README "Running on a GPU") into /tmp/site,
# runs the project from the tree over the image's own packages, and makes $OUT. Also the scripts'
# two helpers: `stamp MESSAGE` (seconds since the script began) and `runs LIMIT_S` (false for a
# step whose time limit is 0: skipped).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM: on the shared multi-GPU hosts a
# program that uses it can put the GPUs out of service for a day or more.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
runs() { [ "${1:-0}" -gt 0 ]; }
