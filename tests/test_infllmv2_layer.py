"""attention="infllmv2" in the model: no new parameters, dense below dense_len, sparse above it,
consistent prefill/decode, trainable and usable for generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.inference import generate
from sparsejax.layers.infllmv2 import heads_per_program
from sparsejax.layers.kv_cache import KVCache
from sparsejax.model import DecoderLM
from tests.test_model import small_config

# Small geometry so CPU tests exercise real selection: blocks of 8, 3 of 5 blocks kept at t=40.
SPARSE = dict(block_size=8, compress_window=4, compress_stride=2, lse_window=8, lse_stride=4,
              init_blocks=1, local_blocks=1, topk=3, dense_len=0)


def sparse_config(**options):
  return small_config(attention="infllmv2", attention_options=tuple(sorted(
      (SPARSE | options).items())))


def with_params_of(source, config):
  """A model of `config` holding `source`'s parameters (what loading a checkpoint does)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))), nnx.Param)
  return nnx.merge(graphdef, nnx.to_pure_dict(nnx.state(source, nnx.Param)))


def test_no_new_parameters_and_dense_below_dense_len():
  dense = DecoderLM(small_config(), rngs=nnx.Rngs(0))
  sparse = with_params_of(dense, sparse_config(dense_len=64))
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  assert shapes(dense) == shapes(sparse)
  tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 97)
  np.testing.assert_array_equal(dense(tokens)[0], sparse(tokens)[0])


def test_topk_covering_every_block_equals_dense():
  dense = DecoderLM(small_config(), rngs=nnx.Rngs(1))
  sparse = with_params_of(dense, sparse_config(topk=8))  # 40 tokens = 5 blocks <= 8
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 97)
  np.testing.assert_allclose(sparse(tokens)[0], dense(tokens)[0], rtol=1e-5, atol=1e-5)


def test_sparse_differs_from_dense_and_decode_matches_prefill():
  dense = DecoderLM(small_config(), rngs=nnx.Rngs(2))
  cfg = sparse_config()
  sparse = with_params_of(dense, cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, 97)
  full, _, _ = sparse(tokens)
  assert not np.allclose(full, dense(tokens)[0], atol=1e-3)  # selection really dropped blocks
  cache = KVCache.init(num_layers=cfg.num_layers, batch=2, capacity=40, num_kv_heads=2,
                       head_dim=cfg.head_dim, dtype=jnp.float32)
  prefix, _, cache = sparse(tokens[:, :30], cache=cache)
  pieces = [prefix]
  for t in range(30, 40):
    step, _, cache = sparse(tokens[:, t:t + 1], cache=cache)
    pieces.append(step)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-4, atol=1e-4)


def trains_and_generates(tmp_path, attention: str, options: dict):
  """Four training steps of a micro model with this attention (the loss falls), then a
  generation; returns the trained model."""
  from tests.test_train import micro_config
  from sparsejax.train.trainer import Trainer
  c = micro_config(tmp_path, steps=4, checkpoint_every=0)
  c.model.attention = attention
  c.model.attention_options = dict(options)
  trainer = Trainer(c, progress=False)
  summary = trainer.train()
  trainer.close()
  losses = [h["loss"] for h in summary["history"]]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  out = generate(trainer.model(), [[1, 2, 3], [4]], max_new_tokens=5)
  assert [len(o) for o in out] == [5, 5]
  return trainer.model()


def test_trains_and_generates(tmp_path):
  trains_and_generates(tmp_path, "infllmv2", SPARSE)


def test_unknown_option_is_named():
  with pytest.raises(ValueError, match=r"unknown keys \['top_k'\]"):
    DecoderLM(sparse_config(top_k=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="topk_kernel.*must be a bool"):
    DecoderLM(sparse_config(topk_kernel="yes"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"attention_options\['block_q'\] must be a power of two"):
    DecoderLM(sparse_config(block_q=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="decode_keys_kernel.*must be a bool"):
    DecoderLM(sparse_config(decode_keys_kernel=1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("heads_per_program,topk_kernel,block_q", [
    (1, False, None), ("auto", True, None), ("auto", True, 4)])
def test_kernel_path_equals_reference_path(heads_per_program, topk_kernel, block_q):
  # small_config's groups are 2 heads
  dense = DecoderLM(small_config(), rngs=nnx.Rngs(4))
  options = dict(block_size=16, compress_window=8, compress_stride=4, lse_window=16, lse_stride=8,
                 topk=2, local_blocks=1)
  reference = with_params_of(dense, sparse_config(kernel="reference", **options))
  kernel = with_params_of(dense, sparse_config(kernel="interpret", topk_kernel=topk_kernel,
                                               heads_per_program=heads_per_program,
                                               block_q=block_q, **options))
  tokens = jax.random.randint(jax.random.key(4), (2, 56), 0, 97)
  seg = jnp.array([[1] * 20 + [2] * 36, [1] * 56], jnp.int32)
  pos = jnp.array([list(range(20)) + list(range(36)), list(range(56))], jnp.int32)
  np.testing.assert_allclose(kernel(tokens, positions=pos, segment_ids=seg)[0],
                             reference(tokens, positions=pos, segment_ids=seg)[0],
                             rtol=2e-4, atol=2e-4)


def test_heads_per_program_option():
  assert [heads_per_program("auto", g) for g in (1, 2, 3, 6, 16, 32)] == [1, 2, 1, 2, 16, 16]
  assert heads_per_program(4, 8) == 4
  for bad in (3, 0, 4.0, True, "all"):
    with pytest.raises(ValueError, match="heads_per_program"):
      heads_per_program(bad, 8)
  with pytest.raises(ValueError, match="dividing num_heads / num_kv_heads = 2"):
    DecoderLM(sparse_config(heads_per_program=4), rngs=nnx.Rngs(0))
