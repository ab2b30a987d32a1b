"""Training Locret's retaining heads beside a frozen pretrained backbone (arXiv 2410.01805).

  python -m experiments.train_retaining_heads --config=configs/locret.py \
      --config.backbone_workdir=runs/pretrain_100m --config.workdir=runs/locret_100m

The paper's recipe: hidden 1024, AdamW lr 5e-4, batch 1, 3000 steps, sequences up to 10k tokens.
`--config=configs/locret.py:tiny` is a CPU-sized run for tests and laptops.
`--config=configs/locret.py:longctx` trains heads beside the long-context ablation's dense 16k
backbone (configs/longctx_ablation.py:gpu, runs/longctx_ablation_gpu/dense) for issue 6's sweep
(experiments/gpu_eviction.sh): the paper's 3000 steps, lengths 4k-16k, the needle tasks that
backbone was trained on, noise and training-split haystacks. The first H100 run had 400 steps
(24 s, about 14 of them compiling the three lengths): held-out recall@10% 0.28 against chance
0.10, and under 4x eviction at 4k Locret kept passkey at 25% where the full cache scored 100%
(experiments/results/eviction_sweep_4k.md). That run trained at 223k tokens/s after its first
step; 3000 steps of 4-16k tokens (9.6k on average) are ~130 s at that rate.
"""
import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/locret_heads"
  c.resume = True
  c.backbone_workdir = "runs/pretrain_100m"
  c.backbone_step = -1  # -1: the newest checkpoint

  c.heads = ml_collections.ConfigDict(dict(hidden=1024))

  # Fields of sparsejax.train.locret.ExampleConfig; lists are comma-separated strings.
  c.data = ml_collections.ConfigDict(dict(
      lengths="4096,8192,16384",  # one drawn per batch; each is one compiled shape
      answer_max_len=128, task_fraction=0.5, tasks="all", haystacks="noise",
      corpus="stdlib", validation_fraction=0.02, seed=0))

  # make_optimizer's fields. The reference clips gradients by value (0.5) and warms up linearly
  # for 2000 of its 3000 steps before a linear decay; we use global-norm clipping and a short
  # warmup into a cosine decay (make_optimizer's schedules). Weight decay: torch AdamW's default.
  c.train = ml_collections.ConfigDict(dict(
      steps=3000, batch_size=1, seed=0, lr=5e-4, schedule="cosine", warmup_steps=100,
      decay_fraction=0.1, min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
      grad_clip=1.0, smooth_weight=0.0025, log_every=10,
      checkpoint_every=500,  # 0: only at the end
      keep_checkpoints=2))

  # Held-out examples (seeds disjoint from training and from the evaluation harness).
  c.eval = ml_collections.ConfigDict(dict(examples=8, recall_fraction=0.1))

  if variant == "tiny":
    c.workdir = "runs/locret_tiny"
    c.backbone_workdir = "runs/tiny"
    c.heads.hidden = 64
    c.data.update(lengths="512", answer_max_len=32, tasks="passkey,multi_key,variable_tracking")
    c.train.update(steps=60, warmup_steps=4, lr=3e-3, log_every=10, checkpoint_every=0)
    c.eval.examples = 4
  elif variant == "longctx":
    c.workdir = "runs/locret_longctx"
    c.backbone_workdir = "runs/longctx_ablation_gpu/dense"
    c.data.update(lengths="4096,8192,16384",
                  tasks="passkey,multi_key,multi_value,multi_query", haystacks="noise,corpus")
    c.train.update(steps=3000, warmup_steps=100, log_every=100, checkpoint_every=0)
  elif variant not in (None, ""):
    raise ValueError(f"configs/locret.py: variant must be '', 'tiny' or 'longctx', got "
                     f"{variant!r}")
  return c
