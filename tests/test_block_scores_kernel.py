"""The fused InfLLM-V2 block-scoring kernel (Pallas, interpret mode on the CPU) against the jnp
reference: ragged lengths, GQA 1/2/3/16, batch 2, packed documents, the exact and approximate
normalisers, other window/stride/block geometries, and the selection built on it."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_scores import block_scores, score_and_select
from sparsejax.ops import infllmv2 as ref_ops

CFG = ref_ops.InfLLMv2Config(block_size=16, compress_window=8, compress_stride=4, lse_window=16,
                             lse_stride=8, init_blocks=1, local_blocks=1, topk=3, dense_len=0)


def inputs(seed, batch, seq, heads, kv_heads, dim):
  keys = jax.random.split(jax.random.key(seed), 2)
  return (jax.random.normal(keys[0], (batch, seq, heads, dim)),
          jax.random.normal(keys[1], (batch, seq, kv_heads, dim)))


def packed(batch, seq, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), size=2, replace=False))
    rows.append(np.searchsorted(cuts, np.arange(seq), side="right") + 1)
  return jnp.asarray(np.stack(rows), jnp.int32)


CASES = [  # batch, seq, heads, kv_heads, dim, packed, approximate_lse
    (1, 100, 4, 2, 16, False, False),   # ragged: 100 = 6.25 blocks
    (2, 130, 4, 2, 16, True, False),    # batch 2, three documents per row
    (1, 200, 16, 1, 32, False, True),   # GQA 16, approximate normaliser
    (2, 77, 2, 2, 16, True, True),      # GQA 1, ragged, packed, approximate
    (1, 150, 6, 2, 16, True, False),    # GQA 3: heads padded to 4 inside the kernel
]


@pytest.mark.parametrize("batch,seq,heads,kv_heads,dim,is_packed,approx", CASES)
def test_interpret_matches_reference(batch, seq, heads, kv_heads, dim, is_packed, approx):
  q, k = inputs(seq + heads, batch, seq, heads, kv_heads, dim)
  seg = packed(batch, seq, seq) if is_packed else None
  cfg = dataclasses.replace(CFG, approximate_lse=approx)
  want = ref_ops.block_scores(q, k, cfg, segment_ids=seg)
  got = block_scores(q, k, cfg, segment_ids=seg, implementation="interpret", block_rows=32)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,stride", [(4, 4), (12, 4), (16, 8)])
def test_other_pooling_geometries(window, stride):
  """overlap = window / stride of 1, 3 and 2 (block_size / stride = 4 or 2 windows per block)."""
  cfg = dataclasses.replace(CFG, compress_window=window, compress_stride=stride)
  q, k = inputs(window, 1, 120, 4, 2, 16)
  seg = packed(1, 120, window)
  want = ref_ops.block_scores(q, k, cfg, segment_ids=seg)
  got = block_scores(q, k, cfg, segment_ids=seg, implementation="interpret", block_rows=32,
                     block_windows=16 * (cfg.block_size // stride))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shorter_than_one_window_scores_zero():
  q, k = inputs(0, 1, 6, 4, 2, 16)
  got = block_scores(q, k, CFG, implementation="interpret", block_rows=32)
  np.testing.assert_array_equal(got, np.zeros((1, 6, 2, 1), np.float32))


def test_selection_equals_reference_selection():
  q, k = inputs(3, 2, 140, 8, 2, 16)
  seg = packed(2, 140, 3)
  cfg = dataclasses.replace(CFG, topk=4)
  want = ref_ops.select_blocks(ref_ops.block_scores(q, k, cfg, segment_ids=seg), cfg, q_len=140,
                               kv_len=140, segment_ids=seg)
  got = score_and_select(q, k, cfg, segment_ids=seg, implementation="interpret", block_rows=32)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_bad_inputs_are_named():
  q, k = inputs(0, 1, 64, 4, 2, 16)
  with pytest.raises(ValueError, match="implementation"):
    block_scores(q, k, CFG, implementation="cuda")
  with pytest.raises(ValueError, match="num_kv_heads"):
    block_scores(q[:, :, :3], k, CFG, implementation="interpret")
  with pytest.raises(ValueError, match="segment_ids"):
    block_scores(q, k, CFG, segment_ids=jnp.ones((1, 63), jnp.int32), implementation="interpret")
  with pytest.raises(ValueError, match="block_rows"):
    block_scores(q, k, CFG, implementation="interpret", block_rows=24)
  with pytest.raises(ValueError, match="power of two"):
    block_scores(q, k, dataclasses.replace(CFG, block_size=12, compress_window=4,
                                           compress_stride=4),
                 implementation="interpret")
