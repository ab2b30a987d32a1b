"""The trainer: exact resume, learning, checkpoints, configuration errors."""
import os

import jax
import numpy as np
import pytest

from configs.tiny import get_config
from sparsejax.train.checkpoint import load_model
from sparsejax.train.optim import make_schedule
from sparsejax.train.trainer import Trainer


def micro_config(workdir, **train):
  c = get_config()
  c.workdir = str(workdir)
  c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                 ffn_hidden=64, max_seq_len=64)
  c.data.seq_len = 32
  c.train.update(dict(steps=6, batch_size=4, warmup_steps=2, log_every=1, eval_every=0,
                      eval_batches=2, checkpoint_every=3) | train)
  return c


def params_of(trainer):
  return jax.tree.map(np.asarray, trainer.params)


def with_retrieval_rows(workdir):
  c = micro_config(workdir, steps=4, checkpoint_every=2, batch_size=2)
  c.model.max_seq_len = c.data.seq_len = 320
  c.retrieval_mix.update(fraction=0.5, tasks="passkey")
  return c


@pytest.mark.parametrize("make_config", [micro_config, with_retrieval_rows])
def test_exact_resume(tmp_path, make_config):
  straight = Trainer(make_config(tmp_path / "a"), progress=False)
  full = straight.train()
  straight.close()
  half_steps = straight.config.train.checkpoint_every

  first = Trainer(make_config(tmp_path / "b"), progress=False)
  half = first.train(steps=half_steps)
  first.close()
  resumed = Trainer(make_config(tmp_path / "b"), progress=False)
  assert resumed.step == half_steps
  rest = resumed.train()
  resumed.close()

  losses = [h["loss"] for h in full["history"]]
  resumed_losses = [h["loss"] for h in half["history"] + rest["history"]]
  assert losses == resumed_losses
  jax.tree.map(np.testing.assert_array_equal, params_of(straight), params_of(resumed))


def test_grad_accumulation_matches_full_batch(tmp_path):
  one = Trainer(micro_config(tmp_path / "a", steps=2, checkpoint_every=0), progress=False)
  one.train()
  two = Trainer(micro_config(tmp_path / "b", steps=2, checkpoint_every=0, grad_accum_steps=2),
                progress=False)
  two.train()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               params_of(one), params_of(two))


def test_loss_drops_and_checkpoint_loads(tmp_path):
  c = micro_config(tmp_path, steps=40, lr=1e-2, warmup_steps=5, eval_every=40, log_every=10,
                   checkpoint_every=40)
  trainer = Trainer(c, progress=False)
  summary = trainer.train()
  trainer.close()
  assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"] - 1.0
  assert os.path.exists(os.path.join(tmp_path, "logs", "train_metrics.csv"))
  model, tokenizer, meta = load_model(str(tmp_path))
  assert meta["step"] == 40
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, trainer.params),
               jax.tree.map(np.asarray, __import__("flax").nnx.to_pure_dict(
                   __import__("flax").nnx.state(model, __import__("flax").nnx.Param))))


def test_mismatched_checkpoint_shapes(tmp_path):
  trainer = Trainer(micro_config(tmp_path, checkpoint_every=1), progress=False)
  trainer.train(steps=1)
  trainer.close()
  c = micro_config(tmp_path)
  c.model.ffn_hidden = 96
  with pytest.raises(ValueError, match=r"w_down has shape \(64, 32\) in the checkpoint but \(96, 32\)"):
    Trainer(c, progress=False)


def test_refuses_to_overwrite_a_run(tmp_path):
  trainer = Trainer(micro_config(tmp_path, checkpoint_every=1), progress=False)
  trainer.train(steps=1)
  trainer.close()
  c = micro_config(tmp_path)
  c.resume = False
  with pytest.raises(ValueError, match="already holds checkpoints"):
    Trainer(c, progress=False)


def test_missing_data_path(tmp_path):
  c = micro_config(tmp_path)
  c.data.source = str(tmp_path / "nowhere" / "*.txt")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    Trainer(c, progress=False)


def test_empty_corpus(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.txt").write_text("x" * 100)
  c = micro_config(tmp_path / "run")
  c.data.source = str(tmp_path / "docs" / "*.txt")
  c.data.validation_fraction = 0.0  # the only file goes to train: validation is empty
  trainer = None
  with pytest.raises(ValueError, match="empty corpus"):
    trainer = Trainer(c, progress=False)
    trainer.evaluate()


def test_sequence_longer_than_model_maximum(tmp_path):
  c = micro_config(tmp_path)
  c.data.seq_len = 128
  with pytest.raises(ValueError, match="data.seq_len=128 exceeds model.max_seq_len=64"):
    Trainer(c, progress=False)


def test_tokenizer_larger_than_vocab(tmp_path):
  c = micro_config(tmp_path)
  c.model.vocab_size = 200
  with pytest.raises(ValueError, match="259 ids but model.vocab_size=200"):
    Trainer(c, progress=False)


def test_wsd_schedule_shape():
  s = make_schedule("wsd", lr=1.0, steps=100, warmup_steps=10, decay_fraction=0.2,
                    min_lr_ratio=0.1)
  assert float(s(0)) == 0.0
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(79)) == pytest.approx(1.0)
  assert float(s(100)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="kind must be"):
    make_schedule("linear", lr=1.0, steps=10, warmup_steps=1)
