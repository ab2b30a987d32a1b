"""Generation with the union-of-experts kernel installed (sparsejax.inference.union_decode) on the
GPU: a bf16 BlockFFN model at the ablation's layer shape (d_model 384, 48 experts of width 32),
the decode step's logits against the dense expert mix, and greedy tokens."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.blockffn_ablation import get_config
from pallas_kernels.union_ffn import UnionFFNConfig
from sparsejax.inference.union_decode import clear_union_decode, prepare_union_decode
from sparsejax.layers.kv_cache import KVCache
from sparsejax.model import DecoderLM
from sparsejax.train.trainer import model_and_data_configs


def decode_step_logits(model, tokens):
  batch, width = tokens.shape
  cache = KVCache.for_model(model.config, batch=batch, capacity=width + 1)
  prefill, _, cache = model(tokens, cache=cache)
  nxt = jnp.argmax(prefill[:, -1], -1)[:, None]
  return model(nxt, positions=cache.lengths[:, None], segment_ids=jnp.ones_like(nxt),
               cache=cache)[0][:, 0]


@pytest.mark.parametrize("batch,config", [(1, None), (8, None), (32, UnionFFNConfig())])
def test_decode_step_matches_the_dense_mix(batch, config):
  model_config, _ = model_and_data_configs(get_config("blockffn"))
  model = DecoderLM(model_config, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(batch).integers(3, 250, (batch, 64)), jnp.int32)
  want = decode_step_logits(model, tokens)
  assert prepare_union_decode(model, config=config) == model_config.num_layers
  got = decode_step_logits(model, tokens)
  clear_union_decode(model)
  # bf16 activations: the kernel and the dense mix round at different points.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0.05, atol=0.05)
  assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) >= 0.9
