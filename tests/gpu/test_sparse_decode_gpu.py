"""The block-sparse decode kernel on the GPU (Triton lowering), bf16, at 32k-128k context, batch
8, 32 query heads / 2 KV heads, head dim 128, with InfLLM-V2's shipped selection from compressed
keys, against the jnp reference; the whole kernel step (infllmv2_decode: forced blocks attended
by the scores kernel); and decode steps through the model (kernel vs jnp decode)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.block_scores import select_decode_blocks
from pallas_kernels.infllmv2_decode import infllmv2_decode
from pallas_kernels.sparse_decode import sparse_decode
from sparsejax.config import ModelConfig
from sparsejax.layers.kv_cache import KVCache
from sparsejax.model import DecoderLM
from sparsejax.ops import infllmv2 as ref_ops

BATCH, HEADS, KV_HEADS, DIM = 8, 32, 2, 128


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _inputs(key, capacity, packed):
  keys = jax.random.split(key, 3)
  q = jax.random.normal(keys[0], (BATCH, 1, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(keys[1], (BATCH, capacity, KV_HEADS, DIM), jnp.bfloat16)
  v = jax.random.normal(keys[2], (BATCH, capacity, KV_HEADS, DIM), jnp.bfloat16)
  # Ragged positions: full caches, mid-cache rows, and rows below dense_len (dense fallback).
  # (8191: length 8192 = dense_len, sparse; 8190 and 100: below it.)
  q_start = jnp.array([capacity - 1, capacity - 2, capacity - 1000, capacity // 2 + 5, 20000,
                       8191, 8190, 100], jnp.int32)
  seg = kv_seg = None
  if packed:  # the model always passes segment ids; row 3's document starts at token 3000
    kv_seg = jnp.ones((BATCH, capacity), jnp.int32).at[3, 3000:].set(2)
    seg = jnp.ones((BATCH, 1), jnp.int32).at[3].set(2)
  return q, k, v, q_start, seg, kv_seg


@functools.partial(jax.jit, static_argnames=("cfg", "implementation", "num_splits"))
def _select_and_attend(q, k, v, kc, q_start, seg, kv_seg, *, cfg, implementation,
                       num_splits=None):
  idx, valid = ref_ops.select_decode_blocks(q, kc, cfg, kv_len=k.shape[1], q_start=q_start,
                                            segment_ids=seg, kv_segment_ids=kv_seg)
  out, lse = sparse_decode(q[:, 0], k, v, idx[:, 0], valid[:, 0], q_start + 1,
                           block_size=cfg.block_size,
                           q_segment_ids=None if seg is None else seg[:, 0],
                           kv_segment_ids=kv_seg, implementation=implementation,
                           num_splits=num_splits, poison_outputs=implementation == "pallas")
  return out, lse, idx, valid


@pytest.mark.parametrize("capacity,packed", [(32768, True), (65536 + 37, False), (131072, True)])
def test_pallas_decode_matches_jnp_reference(capacity, packed):
  cfg = ref_ops.InfLLMv2Config()  # shipped: blocks of 64, windows 32/16, topk 96, dense_len 8192
  q, k, v, q_start, seg, kv_seg = _inputs(jax.random.key(capacity), capacity, packed)
  kc = jax.jit(functools.partial(ref_ops.compress_keys, window=32, stride=16))(k)
  got, got_lse, idx, valid = _select_and_attend(q, k, v, kc, q_start, seg, kv_seg, cfg=cfg,
                                                implementation="pallas")
  # The jnp semantics on the SAME selection (scoring twice in different programs could break
  # near-ties differently): sparsejax.ops.infllmv2.sparse_attention, in float32.
  want, want_lse = jax.jit(functools.partial(ref_ops.sparse_attention, cfg=cfg, return_lse=True))(
      q, k, v, idx, valid, segment_ids=seg, kv_segment_ids=kv_seg, q_start=q_start,
      kv_lengths=q_start + 1)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  assert np.isfinite(np.asarray(got_lse)).all()
  assert rel_err(got, want[:, 0]) < 1e-2
  assert rel_err(got_lse, want_lse[:, 0]) < 1e-3
  # Rows below dense_len attend their whole prefix (dense fallback folded into the blocks).
  assert int(valid[7, 0, 0].sum()) == 2 and int(valid[6, 0, 0].sum()) == 128
  assert int(valid[0, 0, 0].sum()) == 96 and int(valid[5, 0, 0].sum()) == 96


@pytest.mark.parametrize("capacity,packed,topk", [(32768, True, 96), (65536 + 37, False, 64),
                                                   (131072, True, 64)])
def test_decode_step_with_forced_blocks_matches_jnp_reference(capacity, packed, topk):
  """pallas_kernels.infllmv2_decode: the decode scores kernel selects and attends the forced
  blocks (init + local) meanwhile; sparse_decode attends the unforced winners and merges. Against
  the jnp semantics on the kernels' own selection (block_scores.select_decode_blocks)."""
  cfg = ref_ops.InfLLMv2Config(topk=topk)
  q, k, v, q_start, seg, kv_seg = _inputs(jax.random.key(capacity + 1), capacity, packed)
  kc = jax.jit(functools.partial(ref_ops.compress_keys, window=32, stride=16))(k)
  kw = dict(q_start=q_start, segment_ids=seg, kv_segment_ids=kv_seg)
  got = jax.jit(functools.partial(infllmv2_decode, cfg=cfg))(q, k, v, kc, **kw)
  idx, valid = jax.jit(functools.partial(select_decode_blocks, cfg=cfg, kv_len=capacity))(
      q, kc, **kw)
  want = jax.jit(functools.partial(ref_ops.sparse_attention, cfg=cfg))(
      q, k, v, idx, valid, kv_lengths=q_start + 1, **kw)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  assert rel_err(got, want) < 1e-2
  plain = jax.jit(functools.partial(infllmv2_decode, cfg=cfg, forced_splits=0))(q, k, v, kc, **kw)
  assert rel_err(got, plain) < 1e-2


@pytest.mark.parametrize("capacity,packed,forced_splits,num_splits", [
    (65536 + 40, False, None, None), (131072, True, None, 16), (131072, False, 3, 5),
    (32768, True, 0, None)])
def test_decode_step_with_the_mosaic_kernel(capacity, packed, forced_splits, num_splits):
  """sparse_decode's Mosaic GPU kernel (kernel_mosaic.py: TMA loads, the combine by the last
  split after a global-memory semaphore) in the decode step, against the Triton step on the same
  inputs and the jnp semantics on the kernels' selection (packed: segment ids); called twice, the
  second call equal to the first."""
  cfg = ref_ops.InfLLMv2Config(topk=64)
  q, k, v, q_start, seg, kv_seg = _inputs(jax.random.key(capacity + 2), capacity, packed)
  kc = jax.jit(functools.partial(ref_ops.compress_keys, window=32, stride=16))(k)
  kw = dict(q_start=q_start, segment_ids=seg, kv_segment_ids=kv_seg)
  step = lambda kernel: jax.jit(functools.partial(
      infllmv2_decode, cfg=cfg, forced_splits=forced_splits, num_splits=num_splits,
      decode_kernel=kernel, num_stages=4 if kernel == "mosaic" else 3))
  mosaic = step("mosaic")
  got = mosaic(q, k, v, kc, **kw)
  again = mosaic(q, k, v, kc, **kw)
  triton = step("triton")(q, k, v, kc, **kw)
  idx, valid = jax.jit(functools.partial(select_decode_blocks, cfg=cfg, kv_len=capacity))(
      q, kc, **kw)
  want = jax.jit(functools.partial(ref_ops.sparse_attention, cfg=cfg))(
      q, k, v, idx, valid, kv_lengths=q_start + 1, **kw)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  assert rel_err(got, want) < 1e-2 and rel_err(got, triton) < 1e-2
  np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_pallas_decode_splits(num_splits):
  cfg = ref_ops.InfLLMv2Config()
  q, k, v, q_start, seg, kv_seg = _inputs(jax.random.key(7), 32768, False)
  kc = jax.jit(functools.partial(ref_ops.compress_keys, window=32, stride=16))(k)
  got, got_lse, _, _ = _select_and_attend(q, k, v, kc, q_start, seg, kv_seg, cfg=cfg,
                                          implementation="pallas", num_splits=num_splits)
  want, want_lse, _, _ = _select_and_attend(q, k, v, kc, q_start, seg, kv_seg, cfg=cfg,
                                            implementation="reference")
  assert rel_err(got, want) < 1e-2
  assert rel_err(got_lse, want_lse) < 1e-3


def test_model_decode_steps_kernel_equals_jnp_decode():
  """Teacher-forced decode through a 2-layer model (float32): the layer's GPU path (cached
  compressed keys + the Pallas kernel) against its jnp decode on the same cache type."""
  options = dict(block_size=64, compress_window=32, compress_stride=16, init_blocks=1,
                 local_blocks=1, topk=4, dense_len=256)
  config = lambda kernel: ModelConfig(
      vocab_size=259, d_model=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
      ffn_hidden=512, max_seq_len=2048, dtype="float32", attention="infllmv2",
      attention_options=tuple(sorted((options | {"kernel": kernel}).items())))
  pallas = DecoderLM(config("pallas"), rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config("reference"),
                                                           rngs=nnx.Rngs(0))), nnx.Param)
  reference = nnx.merge(graphdef, nnx.to_pure_dict(nnx.state(pallas, nnx.Param)))
  lengths = np.array([700, 300, 200], np.int32)  # row 2 starts below dense_len
  width, steps = int(lengths.max()), 8
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 259, (3, width + steps)).astype(np.int32)
  seg = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(graphdef, state, tokens, seg, lengths):
    model = nnx.merge(graphdef, state)
    cache = KVCache.for_model(model.config, batch=3, capacity=width + steps)
    logits, _, cache = model(tokens[:, :width], segment_ids=seg, cache=cache)
    cache = cache.replace(lengths=lengths)
    outs = []
    for i in range(steps):  # the same next tokens for both models
      nxt = jnp.take_along_axis(tokens, (lengths + i)[:, None], axis=1)
      logits, _, cache = model(nxt, positions=cache.lengths[:, None],
                               segment_ids=jnp.ones_like(nxt), cache=cache)
      outs.append(logits[:, 0])
    return jnp.stack(outs, 1)

  got = run(*nnx.split(pallas), tokens, seg, lengths)
  want = run(*nnx.split(reference), tokens, seg, lengths)
  assert rel_err(got, want) < 1e-2
