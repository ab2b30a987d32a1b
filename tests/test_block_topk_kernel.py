"""The sort-free top-k selection kernel (pallas_kernels/block_topk) in interpret mode against the
reference (sparsejax.ops.infllmv2.top_blocks / select_blocks): random keys, heavy ties, +-inf,
huge and tiny magnitudes, rows with fewer eligible blocks than slots, widths that are not powers
of two, and the whole selection from block scores with packed documents."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_topk import merge_tail, select_blocks, top_blocks
from sparsejax.ops import infllmv2 as reference
from sparsejax.ops.infllmv2 import InfLLMv2Config


def _check(key, topk):
  want_idx, want_valid = reference.top_blocks(jnp.asarray(key), topk)
  got_idx, got_valid = top_blocks(jnp.asarray(key), topk, implementation="interpret")
  np.testing.assert_array_equal(np.asarray(got_idx), np.asarray(want_idx))
  np.testing.assert_array_equal(np.asarray(got_valid), np.asarray(want_valid))


# (10, 40), (3, 64): rows narrower than the kept slots (the kernel once left slots past the
# row unwritten: garbage on the GPU, INT_MIN in interpret mode).
@pytest.mark.parametrize("n_blocks,topk", [(16, 4), (37, 8), (64, 64), (100, 16), (5, 8), (10, 40),
                                           (3, 64)])
def test_random_keys_match_the_reference(n_blocks, topk):
  rng = np.random.default_rng(n_blocks * 7 + topk)
  key = rng.normal(size=(3, 2, n_blocks)).astype(np.float32)
  _check(key, topk)


def test_ties_infinities_and_extreme_magnitudes():
  rng = np.random.default_rng(0)
  # Few distinct values: most of the k-th place is decided by the lower-index tie rule.
  key = rng.integers(0, 3, size=(6, 40)).astype(np.float32)
  key[0, :] = 1.0                                   # all equal
  key[1, ::3] = np.inf                              # forced blocks
  key[2, 5:] = -np.inf                              # 5 eligible < topk
  key[3, :] = -np.inf                               # nothing eligible
  key[4, :10] = [3e38, -3e38, 1e-38, -1e-38, 0.0, -0.0, 1e-45, -1e-45, 2.0, -2.0]
  key[5, :] = -rng.random(40).astype(np.float32)    # all negative
  for topk in (1, 7, 12, 40):
    _check(key, topk)


def test_tail_is_merged_as_the_keys_load():
  """top_blocks(key, tail=): block j's key rises to tail[j - 1] unless it is -inf (+inf stays);
  the kernel merges as it loads, the reference through merge_tail, with the same result."""
  rng = np.random.default_rng(3)
  key = rng.random((4, 3, 37)).astype(np.float32)
  tail = rng.random((4, 3, 37)).astype(np.float32) * 1.5
  key[0, :, ::5] = np.inf
  key[1, :, 20:] = -np.inf
  tail[2] = key[2]                       # ties between a block and the one after it
  merged = np.asarray(merge_tail(jnp.asarray(key), jnp.asarray(tail)))
  np.testing.assert_array_equal(merged[..., 0], key[..., 0])
  np.testing.assert_array_equal(merged[..., 1:], np.where(
      key[..., 1:] == -np.inf, -np.inf, np.maximum(key[..., 1:], tail[..., :-1])))
  for topk in (1, 8, 37):
    want = reference.top_blocks(jnp.asarray(merged), topk)
    for implementation in ("interpret", "reference"):
      got = top_blocks(jnp.asarray(key), topk, implementation=implementation,
                       tail=jnp.asarray(tail))
      np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
      np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  with pytest.raises(ValueError, match="tail must be float32 like key"):
    top_blocks(jnp.asarray(key), 4, tail=jnp.asarray(tail[..., :-1]))


def test_negative_zero_ties_with_positive_zero():
  key = np.zeros((1, 16), np.float32)
  key[0, 3] = -0.0
  key[0, 9] = 1.0
  _check(key, 4)  # 9, then the zeros by index (3 counts as a zero at its index)


def test_select_blocks_from_scores_with_documents():
  cfg = InfLLMv2Config(block_size=16, compress_window=16, compress_stride=8, init_blocks=1,
                       local_blocks=2, topk=6, dense_len=0)
  b, t, kvh = 2, 203, 2
  n_blocks = -(-t // cfg.block_size)
  scores = jax.random.uniform(jax.random.key(1), (b, t, kvh, n_blocks))
  scores = scores.at[0, :, 0, 3].set(jnp.nan)  # NaN ranks last among the eligible
  seg = np.ones((b, t), np.int32)
  seg[1, 90:] = 2
  seg[1, 150:] = 0  # padding
  kw = dict(q_len=t, kv_len=t, segment_ids=jnp.asarray(seg))
  want = reference.select_blocks(scores, cfg, **kw)
  got = select_blocks(scores, cfg, implementation="interpret", **kw)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_bad_arguments_name_themselves():
  key = jnp.zeros((2, 8), jnp.float32)
  with pytest.raises(ValueError, match="implementation must be one of"):
    top_blocks(key, 2, implementation="triton")
  with pytest.raises(ValueError, match="topk must be a positive int"):
    top_blocks(key, 0)
  with pytest.raises(ValueError, match="key must be a float32"):
    top_blocks(key.astype(jnp.bfloat16), 2)
