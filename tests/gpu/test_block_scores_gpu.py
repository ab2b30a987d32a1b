"""The fused block-scoring kernel on the GPU (Triton lowering), bf16 inputs, against the jnp
reference at realistic shapes; and the selection built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_scores import block_scores, score_and_select
from sparsejax.ops import infllmv2 as ref_ops


@pytest.mark.parametrize("seq,heads,kv_heads,packed,approx", [
    (8192, 32, 2, False, False), (8192, 32, 2, False, True), (6000, 8, 8, True, True),
    (4100, 16, 1, True, False), (5000, 12, 4, False, False)])
def test_pallas_matches_reference(seq, heads, kv_heads, packed, approx):
  keys = jax.random.split(jax.random.key(seq + heads), 2)
  q = jax.random.normal(keys[0], (1, seq, heads, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, kv_heads, 128), jnp.bfloat16)
  seg = None
  if packed:
    seg = jnp.asarray(np.r_[np.ones(seq // 3), 2 * np.ones(seq - seq // 3)][None], jnp.int32)
  cfg = ref_ops.InfLLMv2Config(init_blocks=1, local_blocks=8, topk=24, dense_len=0,
                               approximate_lse=approx)
  want = jax.jit(lambda q, k: ref_ops.block_scores(q, k, cfg, segment_ids=seg))(q, k)
  got = jax.jit(lambda q, k: block_scores(q, k, cfg, segment_ids=seg))(q, k)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5)
  if seg is None:  # the ranking keys the kernel writes for one-document rows
    keys = jax.jit(lambda q, k: block_scores(q, k, cfg, ranking_keys=True))(q, k)
    want_keys = ref_ops.selection_keys(want, cfg, q_len=seq, kv_len=seq)
    np.testing.assert_array_equal(np.isinf(keys), np.isinf(want_keys))
    np.testing.assert_allclose(keys, want_keys, rtol=2e-3, atol=2e-5)
  idx, valid = jax.jit(lambda q, k: score_and_select(q, k, cfg, segment_ids=seg))(q, k)
  want_idx, want_valid = ref_ops.select_blocks(want, cfg, q_len=seq, kv_len=seq, segment_ids=seg)
  np.testing.assert_array_equal(valid, want_valid)
  # Near-ties may order differently under another summation order; almost every pick agrees.
  same = np.mean(np.asarray(idx) == np.asarray(want_idx))
  assert same > 0.995, same


@pytest.mark.parametrize("capacity,batch,heads,kv_heads,packed,approx", [
    (32768, 8, 32, 2, True, False), (32768, 4, 32, 2, False, True),
    (131072, 8, 32, 2, True, False), (20000, 3, 8, 4, True, True)])
def test_decode_keys_match_reference(capacity, batch, heads, kv_heads, packed, approx):
  """The decode selection-key kernels (bf16 cache) against the jnp keys, at the layer's shapes;
  and the selection with the top-k in the scores kernel against the reference's top-k of those
  same keys (exact), with row 0 below dense_len (the dense fallback)."""
  from pallas_kernels.block_scores import decode_selection_keys, select_decode_blocks
  keys = jax.random.split(jax.random.key(capacity + heads), 2)
  q = jax.random.normal(keys[0], (batch, 1, heads, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, capacity, kv_heads, 128), jnp.bfloat16)
  cfg = ref_ops.InfLLMv2Config(init_blocks=1, local_blocks=32, topk=64, dense_len=8192,
                               approximate_lse=approx)
  kc = ref_ops.compress_keys(k, window=cfg.compress_window, stride=cfg.compress_stride)
  kc2 = ref_ops.compress_keys(k, window=cfg.lse_window, stride=cfg.lse_stride) if approx else None
  q_start = np.linspace(capacity // 2, capacity - 1, batch).astype(np.int32)
  q_start[0] = 5000
  q_start = jnp.asarray(q_start)
  seg = kv_seg = None
  if packed:  # each row's document starts at a different token
    starts = np.linspace(0, capacity // 3, batch).astype(np.int64)
    kv_seg = jnp.asarray((np.arange(capacity)[None] >= starts[:, None]) + 1, jnp.int32)
    seg = jnp.full((batch, 1), 2, jnp.int32)
  kw = dict(kv_len=capacity, q_start=q_start, kc_coarse=kc2, segment_ids=seg,
            kv_segment_ids=kv_seg)
  want = jax.jit(lambda q, kc: decode_selection_keys(q, kc, cfg, implementation="reference",
                                                      **kw))(q, kc)
  got = jax.jit(lambda q, kc: decode_selection_keys(q, kc, cfg, **kw))(q, kc)
  idx, valid = jax.jit(lambda q, kc: select_decode_blocks(q, kc, cfg, **kw))(q, kc)
  want_idx, want_valid = ref_ops.select_decode_blocks(
      q, kc, cfg, selection_keys_fn=lambda *args, **kwargs: got, **kw)
  width = want_idx.shape[-1]
  np.testing.assert_array_equal(np.asarray(idx[..., :width]), np.asarray(want_idx))
  np.testing.assert_array_equal(np.asarray(valid[..., :width]), np.asarray(want_valid))
  assert np.all(np.asarray(idx[..., width:]) == -1)
  n = want.shape[-1]
  got, want = np.asarray(got[..., :n]), np.asarray(want)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  finite = np.isfinite(want)
  np.testing.assert_allclose(got[finite], want[finite], rtol=2e-3, atol=2e-5)
  same = np.mean(np.asarray(ref_ops.top_blocks(jnp.asarray(got), 64)[0])
                 == np.asarray(ref_ops.top_blocks(jnp.asarray(want), 64)[0]))
  assert same > 0.99, same
