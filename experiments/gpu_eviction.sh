#!/bin/bash
# Issue 6 in one device call: Locret's retaining heads beside the long-context ablation's dense
# 16k backbone, then every scorer x compression ratio on the needle tasks. Results in $OUT.
#   bash experiments/gpu_eviction.sh   (on the GPU machine, from the repo root, .whl carried)
# The backbone is runs/longctx_ablation_gpu/dense when the machine still holds it (the call right
# after `experiments.longctx_ablation --scale=gpu`); otherwise it is retrained here with the same
# recipe (PRETRAIN_STEPS, default the config's 1000: ~6.5 min with the continuation, so the heads
# and the sweep then need a second call on the same warm machine; both resume). CONT_STEPS
# (default the ablation's 60) lengthens the 16k continuation; give it its own ROOT.
# Lengths: 4k and 8k by default, where that backbone retrieves with the full cache (2026-12-06:
# passkey 100% at 4k, 67% at 8k, 47% at 16k); at 16k most of what eviction could lose is already
# lost. LENGTHS=16384 SAMPLES=1 gives the length.
# Each step has a time limit (seconds, 0 skips it): HEADS_S, SWEEP_S. The sweep resumes from
# $OUT/eviction_sweep.json when an earlier call's file is put there first.
set -u
source experiments/gpu_env.sh
ROOT=${ROOT:-runs/longctx_ablation_gpu}
HEADS=${HEADS:-runs/locret_longctx}
quiet() { grep -v -i "warning\|^  warnings\|^$"; }
if ! ls "$ROOT"/dense/checkpoints/*/ >/dev/null 2>&1; then
  steps=${PRETRAIN_STEPS:-1000}
  stamp "no backbone in $ROOT/dense: pretraining $steps steps, then the dense 16k continuation"
  python3 -m experiments.pretrain --config=configs/longctx_ablation.py:gpu \
    --config.workdir="$ROOT/pretrain" --config.train.steps=$steps \
    --config.train.checkpoint_every=$steps --config.train.log_every=50 2>&1 | quiet | tail -5
  cont=${CONT_STEPS:-60}
  stamp "dense continuation at 16k: $cont steps"
  python3 -m experiments.pretrain --config=configs/longctx_ablation.py:gpu,dense \
    --config.workdir="$ROOT/dense" --config.train.init_from="$ROOT/pretrain" \
    --config.train.steps=$cont --config.train.warmup_steps=$(( cont / 10 )) \
    --config.train.checkpoint_every=$cont --config.train.eval_every=$(( cont / 2 )) \
    --config.train.log_every=$(( cont / 10 )) 2>&1 | quiet | tail -6
fi
if runs ${HEADS_S:-300}; then
  stamp "retaining heads"
  timeout ${HEADS_S:-300} python3 -m experiments.train_retaining_heads \
    --config=configs/locret.py:longctx --config.backbone_workdir="$ROOT/dense" \
    --config.workdir="$HEADS" 2>&1 | quiet | tail -25
  cp "$HEADS/summary.json" "$OUT/retaining_heads_summary.json" 2>/dev/null
fi
runs ${SWEEP_S:-420} || { stamp "done"; exit 0; }
stamp "eviction sweep"
timeout ${SWEEP_S:-420} python3 -m experiments.eviction_sweep --workdir="$ROOT/dense" \
  --retaining_heads="$HEADS/retaining_heads" --lengths=${LENGTHS:-4096,8192} \
  --tasks=${TASKS:-passkey,multi_key} --samples=${SAMPLES:-2} --batch_size=10 --max_new_tokens=12 \
  --out="$OUT/eviction_sweep" 2>&1 | quiet | tail -40
stamp "done"
