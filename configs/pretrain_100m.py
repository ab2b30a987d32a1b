"""A ~100M-parameter byte-level model at 4k context: the GPU throughput run (one H100).

  python -m experiments.pretrain --config=configs/pretrain_100m.py
"""
from configs.base import base_config


def get_config():
  c = base_config()
  c.workdir = "runs/pretrain_100m"
  c.model.update(vocab_size=512, d_model=1024, num_layers=9, num_heads=8, num_kv_heads=2,
                 head_dim=128, ffn_hidden=2816, max_seq_len=4096, dtype="bfloat16")
  c.data.seq_len = 4096
  c.train.update(steps=300, batch_size=16, lr=1e-3, warmup_steps=50, decay_fraction=0.2,
                 log_every=25, eval_every=0, checkpoint_every=0)
  c.sample.max_new_tokens = 0
  return c
