"""A ~1M-parameter byte-level model (vocabulary: the 256 bytes + 3 specials) that learns Python source on a laptop CPU in a few minutes.

  python -m experiments.pretrain --config=configs/tiny.py
"""
from configs.base import base_config


def get_config():
  c = base_config()
  c.workdir = "runs/tiny"
  c.model.update(vocab_size=259, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32, ffn_hidden=384, max_seq_len=1024, dtype="float32")
  c.data.seq_len = 128
  c.train.update(steps=600, batch_size=16, lr=3e-3, warmup_steps=40, decay_fraction=0.25,
                 log_every=10, eval_every=200, eval_batches=4, checkpoint_every=200)
  # Greedy decoding of a model this small loops on frequent words; sample instead.
  c.sample.update(temperature=0.7, top_p=0.95)
  return c
