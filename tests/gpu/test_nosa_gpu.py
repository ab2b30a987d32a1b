"""NOSA on the GPU, bf16: the biased block-sparse decode kernel at 32k-64k context (batch 8, 32
query heads / 2 KV heads, head dim 128) against the jnp reference, with NOSA's shipped selection;
and the model's NOSA layer, prefill and decode, through the kernels against the jnp reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.sparse_decode import sparse_decode
from sparsejax.config import ModelConfig
from sparsejax.layers.kv_cache import KVCache
from sparsejax.model import DecoderLM
from sparsejax.ops import infllmv2 as ref_ops
from sparsejax.ops.nosa import NOSAConfig, nosa_select_decode_blocks

BATCH, HEADS, KV_HEADS, DIM = 8, 32, 2, 128


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.partial(jax.jit, static_argnames=("capacity", "implementation"))
def _decode(key, *, capacity, implementation):
  cfg = NOSAConfig()
  keys = jax.random.split(key, 4)
  q = jax.random.normal(keys[0], (BATCH, 1, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(keys[1], (BATCH, capacity, KV_HEADS, DIM), jnp.bfloat16)
  v = jax.random.normal(keys[2], (BATCH, capacity, KV_HEADS, DIM), jnp.bfloat16)
  evict = 2.0 * jax.random.normal(keys[3], (BATCH, capacity, KV_HEADS), jnp.float32)
  q_start = jnp.array([capacity - 1, capacity - 2, capacity - 1000, capacity // 2 + 5, 20000,
                       8191, 4000, 100], jnp.int32)
  kc = ref_ops.compress_keys(k, window=cfg.compress_window, stride=cfg.compress_stride)
  idx, _ = nosa_select_decode_blocks(q, kc, evict, cfg, kv_len=capacity, q_start=q_start)
  return sparse_decode(q[:, 0], k, v, idx[:, 0], None, q_start + 1, key_bias=evict,
                       block_size=cfg.block_size, implementation=implementation)


@pytest.mark.parametrize("capacity", [32768, 65536 + 37])
def test_biased_decode_kernel_matches_reference(capacity):
  key = jax.random.key(capacity)
  out, lse = _decode(key, capacity=capacity, implementation="pallas")
  ref_out, ref_lse = _decode(key, capacity=capacity, implementation="reference")
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert rel_err(out, ref_out) < 2e-2
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-3, atol=1e-2)


def _model(kernel):
  options = dict(kernel=kernel, query_topk=33, topk=64)
  config = ModelConfig(vocab_size=512, d_model=512, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=128, ffn_hidden=1024, max_seq_len=16384, attention="nosa",
                       attention_options=tuple(sorted(options.items())), dtype="bfloat16")
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  for block in model.blocks:  # a trained-looking head: scores of a few units
    block.attn.evict_scale[...] = jnp.array([3.0, -2.0])
  return model


def test_layer_kernels_match_reference_prefill_and_decode():
  tokens = jax.random.randint(jax.random.key(1), (2, 9000), 0, 512)
  outs = {}
  for kernel in ("pallas", "reference"):
    model = _model(kernel)
    cache = KVCache.for_model(model.config, batch=2, capacity=9000)
    _, _, cache = model(tokens[:, :8990], cache=cache)   # chunked prefill: the jnp path
    step = model(tokens[:, 8990:8991], cache=cache)[0]    # a decode step: the kernels
    full = jax.jit(lambda m, x: m(x)[0])(model, tokens[:, :8192])  # prefill: the kernels
    outs[kernel] = (full, step)
  assert rel_err(outs["pallas"][0], outs["reference"][0]) < 2e-2
  assert rel_err(outs["pallas"][1], outs["reference"][1]) < 2e-2


def test_mosaic_forward_with_key_bias_matches_reference():
  """The opt-in Mosaic forward with NOSA's bias, bf16 at 4k, against the float32 reference."""
  from pallas_kernels.sparse_attention import Launch, sparse_attention
  seq, block = 4096, 64
  keys = jax.random.split(jax.random.key(3), 5)
  q = jax.random.normal(keys[0], (1, seq, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, KV_HEADS, DIM), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, seq, KV_HEADS, DIM), jnp.bfloat16)
  bias = 2.0 * jax.random.normal(keys[3], (1, seq, KV_HEADS), jnp.float32)
  own = jnp.arange(seq) // block
  idx = jax.random.randint(keys[4], (1, seq, KV_HEADS, 32), 0, seq // block)
  idx = jnp.minimum(idx.at[..., 0].set(own[None, :, None]), own[None, :, None, None])
  valid = jnp.ones(idx.shape, bool)
  run = lambda impl, launch: jax.jit(lambda *a: sparse_attention(
      *a, key_bias=bias, block_size=block, heads_per_program=16, implementation=impl,
      launch=launch))(q, k, v, idx, valid)
  out, lse = run("pallas", Launch(forward_kernel="mosaic", dkdv_kernel="triton"))
  ref_out, ref_lse = run("reference", Launch())
  assert rel_err(out, ref_out) < 2e-2
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-3, atol=1e-2)
