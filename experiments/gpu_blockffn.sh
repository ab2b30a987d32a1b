#!/usr/bin/env bash
# Issue 5's ablation in two device calls of three methods each (configs/blockffn_ablation.py
# says why): the methods train side by side on one GPU, one process each (the 12.9M-parameter
# model is launch-bound, so they overlap), then merge into $OUT/blockffn_ablation.{json,md,png};
# log in $OUT/blockffn_log.txt. tokens/s in the results are under that sharing.
#   METHODS="dense topk_moe remoe" bash experiments/gpu_blockffn.sh            (call 1)
#   METHODS="blockffn blockffn_no_al blockffn_no_cs" bash experiments/gpu_blockffn.sh  (call 2)
# then here: python -m experiments.blockffn_ablation --merge=A.json,B.json \
#   --out=experiments/results/blockffn_ablation
set -u
source experiments/gpu_env.sh
METHODS=${METHODS:?name three methods, e.g. METHODS="dense topk_moe remoe"}
LIMIT_S=${LIMIT_S:-500}  # per method; a call has 600 s
PARTS=/tmp/blockffn_parts
mkdir -p "$PARTS"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.25}
for m in $METHODS; do
  timeout "$LIMIT_S" python3 -m experiments.blockffn_ablation --methods="$m" --size="${SIZE:-gpu}" \
      --workdir=/tmp/blockffn_runs --out="$PARTS/$m" > "$PARTS/$m.log" 2>&1 &
done
wait
for m in $METHODS; do
  echo "== $m"; tr '\r' '\n' < "$PARTS/$m.log" | grep -v -i warn | grep -E "parameters|00/1000|Error" | tail -4
done > "$OUT/blockffn_log.txt"
parts=$(ls "$PARTS"/*.json 2>/dev/null | paste -sd, -)
python3 -m experiments.blockffn_ablation --merge="$parts" --size="${SIZE:-gpu}" --out="$OUT/blockffn_ablation" 2>&1 \
  | grep -v -i warn | tee -a "$OUT/blockffn_log.txt"
