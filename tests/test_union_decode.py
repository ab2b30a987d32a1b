"""Decode steps of expert-FFN models through the union-of-experts kernel (interpret mode)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.blockffn_ablation import get_config
from pallas_kernels.union_ffn import UnionFFNConfig
from sparsejax.inference import generate
from sparsejax.inference.union_decode import clear_union_decode, prepare_union_decode
from sparsejax.layers.kv_cache import KVCache
from sparsejax.model import DecoderLM
from sparsejax.train.trainer import model_and_data_configs

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]


def tiny_model(method, width=16):
  config = get_config(f"{method},tiny")
  if "ffn_options" in config.model and "expert_width" in config.model.ffn_options:
    config.model.ffn_options.expert_width = width
  model_config, _ = model_and_data_configs(config)
  return DecoderLM(model_config, rngs=nnx.Rngs(0))


def prefill_and_step(model, tokens):
  """(prefill logits, the logits of one decode step after it)."""
  batch, width = tokens.shape
  cache = KVCache.for_model(model.config, batch=batch, capacity=width + 1)
  prefill, _, cache = model(tokens, cache=cache)
  nxt = jnp.argmax(prefill[:, -1], -1)[:, None]
  step, _, _ = model(nxt, positions=cache.lengths[:, None], segment_ids=jnp.ones_like(nxt),
                     cache=cache)
  return prefill, step


@pytest.mark.parametrize("method,config", [
    ("blockffn", None),                              # the fused path (the default)
    ("topk_moe", UnionFFNConfig()),                  # two kernels
])
def test_decode_steps_through_the_kernel_match_the_dense_mix(method, config):
  model = tiny_model(method)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 250, (3, 9)), jnp.int32)
  want_prefill, want_step = prefill_and_step(model, tokens)
  want_tokens = generate(model, PROMPTS, max_new_tokens=5)
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  assert prepare_union_decode(model, implementation="interpret", config=config) == 2
  got_prefill, got_step = prefill_and_step(model, tokens)
  np.testing.assert_array_equal(got_prefill, want_prefill)       # prefill keeps the dense path
  np.testing.assert_allclose(got_step, want_step, rtol=1e-4, atol=1e-4)
  assert generate(model, PROMPTS, max_new_tokens=5) == want_tokens
  # The kernel's weights are not parameters: training and checkpoints do not see them.
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
  # And the decode step really reads them: zeroed, the step changes and the prefill does not.
  for block in model.blocks:
    block.ffn.union_decode.up_t[...] = jnp.zeros_like(block.ffn.union_decode.up_t[...])
  zeroed_prefill, zeroed_step = prefill_and_step(model, tokens)
  np.testing.assert_array_equal(zeroed_prefill, want_prefill)
  assert not np.allclose(zeroed_step, want_step, atol=1e-3)
  clear_union_decode(model)
  np.testing.assert_array_equal(prefill_and_step(model, tokens)[1], want_step)


def test_bad_models_and_arguments_are_named():
  with pytest.raises(ValueError, match="no expert-FFN layers \\(ffn='swiglu'\\)"):
    prepare_union_decode(tiny_model("dense"))
  with pytest.raises(ValueError, match="multiples of 16, got d_model=32, width=8"):
    prepare_union_decode(tiny_model("blockffn", width=8))
  assert prepare_union_decode(tiny_model("blockffn", width=8), implementation="reference") == 2
  with pytest.raises(ValueError, match="implementation must be one of"):
    prepare_union_decode(tiny_model("blockffn"), implementation="cuda")
  with pytest.raises(ValueError, match="config must be a UnionFFNConfig"):
    prepare_union_decode(tiny_model("blockffn"), config={"fusion": "fused"})
