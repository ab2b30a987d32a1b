"""The Mosaic GPU sparse_decode kernel (sparse_decode/kernel_mosaic.py) in Mosaic GPU interpret
mode on the CPU against the reference, and its lowering for CUDA without a GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_decode import sparse_decode_reference
from pallas_kernels.sparse_decode.kernel_mosaic import sparse_decode_mosaic


def _inputs(seed, *, batch, kv_heads, group, capacity, live, width=128, block=64, holes=False):
  rng = np.random.default_rng(seed)
  d = 128
  q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, d)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, d)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, d)), jnp.bfloat16)
  n_blocks = -(-capacity // block)
  idx = np.full((batch, kv_heads, width), -1, np.int32)
  for b, h in np.ndindex(batch, kv_heads):
    picked = rng.choice(n_blocks, size=live, replace=False)
    picked[0] = n_blocks - 1                       # the cache's last (maybe partial) block
    idx[b, h, :live] = picked
    if holes:                                      # dead slots between live ones
      idx[b, h, 1:live:3] = -1
  # Ragged fills: row 0 sees the whole cache, the others stop mid-block.
  lengths = np.array([capacity] + list(rng.integers(capacity // 2, capacity, batch - 1)))
  return q, k, v, jnp.asarray(idx), jnp.asarray(lengths, jnp.int32)


def _grouped(q, kv_heads, rows):
  batch, heads, d = q.shape
  group = heads // kv_heads
  return jnp.pad(q.reshape(batch, kv_heads, group, d),
                 ((0, 0), (0, 0), (0, rows - group), (0, 0)))


def _check(got, got_lse, q, kv_heads, want, want_lse):
  batch, heads, d = q.shape
  group = heads // kv_heads
  np.testing.assert_allclose(got[:, :, :group].reshape(batch, heads, d).astype(jnp.float32),
                             want.astype(jnp.float32), atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(got_lse[:, :, :group].reshape(batch, heads), want_lse, atol=1e-3)


@pytest.mark.parametrize("capacity,live,group,splits,stages,holes", [
    (1000, 5, 16, 4, 2, False),     # capacity not a multiple of the block: its last one shifted
    (2048, 11, 16, 8, 2, True),     # dead slots between live ones; splits with nothing to do
    (640, 7, 8, 4, 4, False),       # GQA 8 (rows padded to 16)
    (1024, 6, 32, 2, 2, False),     # GQA 32: two parts a 64-row tile
    (1024, 9, 64, 3, 2, False),     # GQA 64: one part a tile, an odd number of splits
])
def test_mosaic_decode_matches_reference(capacity, live, group, splits, stages, holes):
  q, k, v, idx, lengths = _inputs(capacity, batch=2, kv_heads=2, group=group, capacity=capacity,
                                  live=live, holes=holes)
  rows = max(16, group)
  out, lse = sparse_decode_mosaic(idx, lengths, _grouped(q, 2, rows), k, v, block_k=64,
                                  num_splits=splits, stages=stages, interpret=True)
  assert out.shape == (2, 2, rows, 128) and out.dtype == q.dtype and lse.shape == (2, 2, rows)
  _check(out, lse, q, 2, *sparse_decode_reference(q, k, v, idx, None, lengths, block_size=64))


def test_mosaic_decode_merges_extra_partials():
  """Partials over other blocks (as the forced-block programs write them) merge with the
  kernel's own: the result is the reference over the union of both block sets; a part that saw
  nothing (lse -inf) adds nothing."""
  q, k, v, idx, lengths = _inputs(7, batch=2, kv_heads=2, group=16, capacity=2048, live=12)
  own = idx.at[..., 6:].set(-1)
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  outs, lses = [], []
  for part in range(4):                            # blocks 6..11, two a part, the last empty
    ids = jnp.full_like(idx, -1)
    if part < 3:
      ids = ids.at[..., :2].set(idx[..., 6 + 2 * part:8 + 2 * part])
    o, l = sparse_decode_reference(qf, kf, vf, ids, None, lengths, block_size=64)
    outs.append(o.reshape(2, 2, 16, 128))
    lses.append(l.reshape(2, 2, 16))
  extra = (jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2))
  assert np.all(np.isneginf(extra[1][:, :, 48:]))
  out, lse = sparse_decode_mosaic(own, lengths, _grouped(q, 2, 16), k, v, extra, block_k=64,
                                  num_splits=4, stages=2, interpret=True)
  _check(out, lse, q, 2, *sparse_decode_reference(q, k, v, idx, None, lengths, block_size=64))


def test_mosaic_decode_row_that_sees_nothing():
  """Lengths 0 and all slots dead: zeros and lse -inf, as the reference."""
  q, k, v, idx, _ = _inputs(0, batch=2, kv_heads=1, group=16, capacity=256, live=2)
  idx = idx.at[1].set(-1)
  lengths = jnp.array([0, 256], jnp.int32)
  out, lse = sparse_decode_mosaic(idx, lengths, _grouped(q, 1, 16), k, v, block_k=64,
                                  num_splits=4, interpret=True)
  assert not np.any(np.asarray(out, np.float32)) and np.all(np.isneginf(lse))


def test_mosaic_decode_bad_inputs_are_named():
  q, k, v, idx, lengths = _inputs(0, batch=1, kv_heads=1, group=16, capacity=256, live=2)
  qg = _grouped(q, 1, 16)
  with pytest.raises(ValueError, match="slot width must be a multiple of 128"):
    sparse_decode_mosaic(idx[..., :64], lengths, qg, k, v, block_k=64, num_splits=4,
                         interpret=True)
  with pytest.raises(ValueError, match="rows must be 16, 32 or 64"):
    sparse_decode_mosaic(idx, lengths, qg[:, :, :8], k, v, block_k=64, num_splits=4,
                         interpret=True)
  with pytest.raises(ValueError, match="multiples of 4"):
    sparse_decode_mosaic(idx, lengths, qg, k, v, block_k=64, num_splits=2, interpret=True)


@pytest.mark.parametrize("rows,extra", [(16, False), (16, True), (64, False)])
def test_mosaic_decode_lowers_for_the_gpu(rows, extra):
  """The Pallas lowering rules (layouts, transforms, barriers, semaphores) that interpret mode
  does not exercise; compiling to a cubin needs a GPU (tests/gpu)."""
  spec = jax.ShapeDtypeStruct
  kv = spec((8, 131072, 2, 128), jnp.bfloat16)
  parts = (spec((8, 2, 8 * rows, 128), jnp.float32), spec((8, 2, 8 * rows), jnp.float32))
  fn = jax.jit(lambda idx, lengths, q, k, v, extra: sparse_decode_mosaic(
      idx, lengths, q, k, v, extra, block_k=64, num_splits=8, stages=4))
  lowered = fn.trace(spec((8, 2, 256), jnp.int32), spec((8,), jnp.int32),
                     spec((8, 2, rows, 128), jnp.bfloat16), kv, kv,
                     parts if extra else None).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text
  # One arrival semaphore per (row, KV head) for the whole grid: the kernel call takes 8 x 2 of
  # them. (Scratch semaphores are each CTA's own: 128 CTAs x 16 here. The splits then signal
  # their own copies and the last one waits forever, as the first GPU run did.)
  assert "tensor<16xi32>" in text and f"tensor<{128 * 16}xi32>" not in text


def test_op_with_the_mosaic_kernel_matches_the_triton_one():
  """sparse_decode(kernel="mosaic"): block_valid folded in, the slot row padded to 128, 3 splits
  rounded up to 4 (16 rows), extra partials of 3 parts padded to a whole tile; the same results
  as the Triton kernel; segment ids against the reference; what it cannot take is named."""
  from pallas_kernels.sparse_decode import sparse_decode
  q, k, v, idx, lengths = _inputs(3, batch=2, kv_heads=2, group=16, capacity=1000, live=9)
  idx = idx[..., :16]
  valid = jnp.broadcast_to(jnp.arange(16) % 4 != 1, idx.shape)
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  parts = [sparse_decode_reference(qf, kf, vf, idx.at[..., :2].set(j), None, lengths,
                                   block_size=64) for j in range(3)]
  extra = (jnp.concatenate([o.reshape(2, 2, 16, 128) for o, _ in parts], axis=2),
           jnp.concatenate([l.reshape(2, 2, 16) for _, l in parts], axis=2))
  common = dict(block_size=64, implementation="interpret", num_splits=3, extra_partials=extra)
  got = sparse_decode(q, k, v, idx, valid, lengths, kernel="mosaic", num_stages=2, **common)
  want = sparse_decode(q, k, v, idx, valid, lengths, kernel="triton", **common)
  np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                             atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(got[1], want[1], atol=1e-3)
  # Segment ids: row 0's query in segment 2 (keys 300-899), row 1's in segment 1 (all keys).
  kv_seg = jnp.ones((2, 1000), jnp.int32).at[0, 300:900].set(2)
  q_seg = jnp.array([2, 1], jnp.int32)
  common.pop("extra_partials")
  got = sparse_decode(q, k, v, idx, valid, lengths, kernel="mosaic", q_segment_ids=q_seg,
                      kv_segment_ids=kv_seg, **common)
  want = sparse_decode(q, k, v, idx, valid, lengths, implementation="reference", block_size=64,
                       q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                             atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(got[1], want[1], atol=1e-3)
  with pytest.raises(ValueError, match="kernel must be one of"):
    sparse_decode(q, k, v, idx, valid, lengths, kernel="cuda", block_size=64)
  with pytest.raises(ValueError, match="multiple of 8"):
    sparse_decode(q, k[:, :999], v[:, :999], idx, valid, lengths, kernel="mosaic", block_size=64,
                  implementation="interpret")


def test_infllmv2_decode_step_with_the_mosaic_kernel():
  """The layer's decode step (forced blocks in the scores kernel, the rest in sparse_decode) with
  decode_kernel="mosaic" equals the reference step; at 3 forced programs a row (padded to 4)
  and the default."""
  from pallas_kernels.infllmv2_decode import infllmv2_decode
  from sparsejax.ops import infllmv2
  cfg = infllmv2.InfLLMv2Config(block_size=64, compress_window=32, compress_stride=16,
                                init_blocks=1, local_blocks=2, topk=5, dense_len=256,
                                lse_window=128, lse_stride=64)
  rng = np.random.default_rng(5)
  capacity = 1536
  q = jnp.asarray(rng.standard_normal((2, 1, 32, 128)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((2, capacity, 2, 128)), jnp.bfloat16)
          for _ in range(2))
  q_start = jnp.array([capacity - 1, 200], jnp.int32)   # row 1 below dense_len: every block
  kc = infllmv2.compress_keys(k, window=32, stride=16)
  want = infllmv2.infllmv2_decode(q, k, v, kc, cfg, q_start=q_start)
  for forced_splits in (3, None):
    got = infllmv2_decode(q, k, v, kc, cfg, q_start=q_start, implementation="interpret",
                          forced_splits=forced_splits, decode_kernel="mosaic", num_stages=2)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2, rtol=2e-2)
