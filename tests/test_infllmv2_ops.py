"""InfLLM-V2 reference ops: compression, block scoring, selection, sparse attention, the switch."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.ops.attention import attention_mask, dense_attention
from sparsejax.ops import infllmv2
from sparsejax.ops.infllmv2 import InfLLMv2Config, compress_keys, max_pool_blocks, pool_geometry

# The ops are traced once per shape under jit: op-by-op eager dispatch of these many small ops
# costs more than the compilations (and jit-compatibility is part of the contract).
block_scores = jax.jit(infllmv2.block_scores, static_argnames="cfg")
select_blocks = jax.jit(infllmv2.select_blocks, static_argnames=("cfg", "q_len", "kv_len"))
sparse_attention = jax.jit(infllmv2.sparse_attention, static_argnames=("cfg", "return_lse"))
visible_mask = jax.jit(infllmv2.visible_mask, static_argnames=("cfg", "kv_len"))
infllmv2_attention = jax.jit(infllmv2.infllmv2_attention, static_argnames="cfg")

# Small geometry with the shipped ratios (B/s = 4, l/s = 2: kernel 5, stride 4, padding 1) so that
# sequences of ~100 tokens already span several blocks.
SMALL = InfLLMv2Config(block_size=16, compress_window=8, compress_stride=4, init_blocks=1,
                       local_blocks=2, topk=5, lse_window=32, lse_stride=16, dense_len=0)


def rand_qkv(seed, b, t, h, kvh, d, kv_len=None):
  rng = np.random.default_rng(seed)
  kv_len = t if kv_len is None else kv_len
  q = rng.standard_normal((b, t, h, d)).astype(np.float32)
  k = rng.standard_normal((b, kv_len, kvh, d)).astype(np.float32)
  v = rng.standard_normal((b, kv_len, kvh, d)).astype(np.float32)
  return q, k, v


def packed_segments(t):
  """Row 0: three documents then padding; row 1: one document filling the row."""
  a, c = t // 3, t // 3 + t // 4
  row0 = np.array([1] * a + [2] * (c - a) + [3] * (t - c - 5) + [0] * 5, np.int32)
  return np.stack([row0, np.ones(t, np.int32)])


# ---------------------------------------------------------------------------------------------
# Independent float64 numpy references (loops; tiny sizes only)


def np_compress(k, window, stride):
  b, t, kvh, d = k.shape
  c = max(0, (t - window) // stride + 1)
  out = np.zeros((b, c, kvh, d))
  for i in range(c):
    out[:, i] = k[:, i * stride:i * stride + window].astype(np.float64).mean(axis=1)
  return out


def np_window_visible(bi, tq, i, window, stride, pos, seg, kv_seg, kv_lengths):
  lo, hi = i * stride, i * stride + window - 1
  if hi > pos or (kv_lengths is not None and hi >= kv_lengths[bi]):
    return False
  return seg is None or bool(np.all(kv_seg[bi, lo:hi + 1] == seg[bi, tq]))


def np_block_scores(q, k, cfg, seg=None, kv_seg=None, q_start=None, kv_lengths=None):
  """Stage 1 (per-head softmax over visible compressed keys), 2 (group sum), 3 (overlap max)."""
  q, k = q.astype(np.float64), k.astype(np.float64)
  b, t, h, d = q.shape
  kv_len, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  kv_seg = seg if kv_seg is None else kv_seg
  B, l, s = cfg.block_size, cfg.compress_window, cfg.compress_stride
  kc = np_compress(k, l, s)
  kc2 = np_compress(k, cfg.lse_window, cfg.lse_stride)
  c, nb = kc.shape[1], -(-kv_len // B)
  out = np.zeros((b, t, kvh, nb))
  for bi in range(b):
    for tq in range(t):
      pos = tq + (0 if q_start is None else q_start[bi])
      vis = np.array([np_window_visible(bi, tq, i, l, s, pos, seg, kv_seg, kv_lengths)
                      for i in range(c)], bool)
      vis2 = np.array([np_window_visible(bi, tq, i, cfg.lse_window, cfg.lse_stride, pos, seg,
                                         kv_seg, kv_lengths) for i in range(kc2.shape[1])], bool)
      grouped = np.zeros((kvh, c))
      for n in range(h):
        if not vis.any():
          continue
        kv = n // g
        logits = kc[bi, :, kv] @ q[bi, tq, n] / math.sqrt(d)
        lse = np.logaddexp.reduce(logits[vis])
        if cfg.approximate_lse and vis2.any():
          lse = np.logaddexp.reduce((kc2[bi, :, kv] @ q[bi, tq, n] / math.sqrt(d))[vis2])
        grouped[kv] += np.where(vis, np.exp(logits - lse), 0.0)
      for j in range(nb):
        over = [i for i in range(c) if i * s < (j + 1) * B and i * s + l > j * B]
        out[bi, tq, :, j] = grouped[:, over].max(axis=1) if over else 0.0
  return out


def np_masked_attention(q, k, v, mask):
  """Float64 masked softmax attention with a per-KV-head mask [b, t, kvh, s]; returns (out, lse)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  g = h // k.shape[2]
  mask = np.repeat(np.asarray(mask), g, axis=2)  # [b, t, h, s]
  logits = np.einsum("btnd,bsnd->btns", q, np.repeat(k, g, axis=2)) / math.sqrt(d)
  logits = np.where(mask, logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  p = np.exp(logits - m)
  lse = np.log(p.sum(-1)) + m[..., 0]
  p /= p.sum(-1, keepdims=True)
  return np.einsum("btns,bsnd->btnd", p, np.repeat(v, g, axis=2)), lse


def full_cover(cfg, kv_len):
  """The same geometry with topk covering every block (the sparse path must then equal dense)."""
  return dataclasses.replace(cfg, topk=max(-(-kv_len // cfg.block_size), cfg.topk))


# ---------------------------------------------------------------------------------------------
# Compression and scoring


@pytest.mark.parametrize("t,window,stride", [(7, 8, 4), (8, 8, 4), (47, 8, 4), (100, 32, 16),
                                             (131, 32, 16), (31, 32, 16)])
def test_compress_keys_matches_loop(t, window, stride):
  """Mean over full windows only: c = max(0, (t - l)//s + 1), a ragged tail window is dropped."""
  k = np.random.default_rng(t).standard_normal((2, t, 3, 4)).astype(np.float32)
  kc = compress_keys(jnp.asarray(k), window=window, stride=stride)
  assert kc.shape == (2, max(0, (t - window) // stride + 1), 3, 4)
  np.testing.assert_allclose(np.asarray(kc), np_compress(k, window, stride), rtol=1e-6, atol=1e-6)


def test_pool_geometry_is_kernel5_stride4_pad1_at_shipped_sizes():
  """The overlap rule reproduces the reference's hard-coded pooling at 64/32/16 (and SMALL)."""
  assert pool_geometry(InfLLMv2Config()) == (5, 4, 1)
  assert pool_geometry(SMALL) == (5, 4, 1)
  # l = 4s is where the reference's fixed kernel (B/s + 1, padding 1) would be wrong: 4 + 3 = 7.
  assert pool_geometry(InfLLMv2Config(compress_window=64)) == (7, 4, 3)


def test_max_pool_equals_kernel5_stride4_pad1_at_default_sizes():
  """Block j takes max(scores[4j-1 : 4j+4]) clipped to the existing windows, as max_pooling_1d."""
  cfg = InfLLMv2Config()
  for t in (64, 1000, 4096 + 37):
    c = (t - 32) // 16 + 1
    n_blocks = -(-t // 64)
    scores = np.random.default_rng(t).standard_normal((3, c)).astype(np.float32)
    pooled = np.asarray(max_pool_blocks(jnp.asarray(scores), cfg, n_blocks=n_blocks))
    for j in range(n_blocks):
      start, end = max(4 * j - 1, 0), min(4 * j - 1 + 5, c)
      expected = scores[:, start:end].max(axis=1) if end > start else np.zeros(3)
      np.testing.assert_array_equal(pooled[:, j], expected)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (16, 1)])
@pytest.mark.parametrize("approximate_lse", [False, True])
def test_block_scores_match_float64_reference(num_heads, num_kv_heads, approximate_lse):
  """All three stages against a loop reference, on ragged packed rows (windows never cross docs)."""
  t = 77
  q, k, _ = rand_qkv(num_heads + num_kv_heads, 2, t, num_heads, num_kv_heads, 8)
  seg = packed_segments(t)
  cfg = dataclasses.replace(SMALL, approximate_lse=approximate_lse)
  got = block_scores(jnp.asarray(q), jnp.asarray(k), cfg, segment_ids=jnp.asarray(seg))
  assert got.shape == (2, t, num_kv_heads, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np_block_scores(q, k, cfg, seg), rtol=1e-5, atol=1e-6)


def test_stage1_softmax_and_group_sum_with_identity_pooling():
  """With B = l = s the pooling is the identity: each row sums to the group size (a softmax per
  query head, summed over the heads of the group), or to 0 before the first complete window."""
  cfg = InfLLMv2Config(block_size=4, compress_window=4, compress_stride=4, init_blocks=1,
                       local_blocks=1, topk=2, lse_window=8, lse_stride=4, dense_len=0)
  assert pool_geometry(cfg) == (1, 1, 0)
  q, k, _ = rand_qkv(5, 2, 30, 8, 2, 8)
  got = np.asarray(block_scores(jnp.asarray(q), jnp.asarray(k), cfg))
  sums = got.sum(-1)
  np.testing.assert_allclose(sums[:, 3:], 4.0, rtol=1e-5)  # query 3 sees window [0, 4)
  np.testing.assert_array_equal(sums[:, :3], 0.0)
  np.testing.assert_allclose(got, np_block_scores(q, k, cfg), rtol=1e-5, atol=1e-6)


def test_block_scores_decode_row_equals_prefill_row():
  """A decode step (q_len=1 at q_start, cache filled to kv_lengths, garbage past it) scores exactly
  like the same query inside a full prefill: compressed causality is the same rule."""
  t, cap = 90, 112
  q, k, _ = rand_qkv(7, 2, t, 4, 2, 8, kv_len=cap)
  seg = packed_segments(t)
  kv_seg = np.concatenate([seg, np.zeros((2, cap - t), np.int32)], 1)
  full = block_scores(jnp.asarray(q), jnp.asarray(k[:, :t]), SMALL, segment_ids=jnp.asarray(seg))
  for p in (30, 63, 89):
    lengths = np.array([p + 1, p + 1])
    step = block_scores(jnp.asarray(q[:, p:p + 1]), jnp.asarray(k), SMALL,
                        segment_ids=jnp.asarray(seg[:, p:p + 1]), kv_segment_ids=jnp.asarray(kv_seg),
                        q_start=jnp.asarray([p, p]), kv_lengths=jnp.asarray(lengths))
    n = full.shape[-1]
    np.testing.assert_allclose(step[:, 0, :, :n], full[:, p], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(step[:, 0, :, n:], 0.0)
    ref = np_block_scores(q[:, p:p + 1], k, SMALL, seg[:, p:p + 1], kv_seg, q_start=[p, p],
                          kv_lengths=lengths)
    np.testing.assert_allclose(step, ref, rtol=1e-5, atol=1e-6)


def test_approximate_lse_rescales_scores_but_keeps_the_selection():
  """The coarse normaliser changes each head's scores by roughly one factor per (query, head), so
  the normalised scores and the selected blocks barely move. Measured here (t=512, group 16):
  raw scores ~4.5x larger, normalised L1 difference ~0.002, block overlap ~99.5%."""
  cfg = InfLLMv2Config(block_size=16, compress_window=8, compress_stride=4, init_blocks=1,
                       local_blocks=4, topk=16, lse_window=32, lse_stride=16, dense_len=0)
  q, k, _ = rand_qkv(0, 1, 512, 16, 1, 16)
  exact = np.asarray(block_scores(jnp.asarray(q), jnp.asarray(k), cfg))
  approx = np.asarray(block_scores(jnp.asarray(q), jnp.asarray(k),
                                   dataclasses.replace(cfg, approximate_lse=True)))
  rows = slice(128, None)  # every query here sees several coarse windows
  exact, approx = exact[0, rows], approx[0, rows]
  normalise = lambda x: x / x.sum(-1, keepdims=True)
  assert 3.0 < float(np.median(approx.sum(-1) / exact.sum(-1))) < 6.0
  l1 = np.abs(normalise(approx) - normalise(exact)).sum(-1).mean()
  assert l1 < 0.02, l1
  picks = [np.asarray(select_blocks(jnp.asarray(s)[None], cfg, q_len=384, kv_len=512,
                                    q_start=jnp.array([128]))[0])[0].reshape(-1, cfg.topk)
           for s in (exact, approx)]
  overlap = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / (a >= 0).sum() for a, b in zip(*picks)])
  assert overlap > 0.97, overlap


# ---------------------------------------------------------------------------------------------
# Selection


def np_eligible(seg, kv_seg, pos, kv_len, B):
  """[n_blocks] bool: blocks at or before the query's block holding a key of its document."""
  nb = -(-kv_len // B)
  out = np.zeros(nb, bool)
  for j in range(min(pos // B, nb - 1) + 1):
    out[j] = seg is None or bool(np.any(kv_seg[j * B:(j + 1) * B] == seg))
  return out


@pytest.mark.parametrize("packed", [False, True])
def test_select_blocks_invariants(packed):
  """Forced blocks always in, never a future or foreign block, exactly min(topk, eligible) valid,
  valid indices ascending then -1."""
  t, cfg = 100, dataclasses.replace(SMALL, init_blocks=2, topk=6)
  scores = np.random.default_rng(1).random((2, t, 3, 7)).astype(np.float32)
  seg = packed_segments(t) if packed else None
  idx, valid = select_blocks(jnp.asarray(scores), cfg, q_len=t, kv_len=t,
                             segment_ids=None if seg is None else jnp.asarray(seg))
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx.shape == valid.shape == (2, t, 3, 6) and idx.dtype == np.int32
  for b in range(2):
    for p in range(t):
      elig = np_eligible(None if seg is None else seg[b, p], None if seg is None else seg[b], p, t, 16)
      doc_blocks = np.flatnonzero(elig)
      forced = set(doc_blocks[:2]) | {j for j in doc_blocks if j > p // 16 - 2}
      for h in range(3):
        n = int(valid[b, p, h].sum())
        assert n == min(6, elig.sum())
        assert valid[b, p, h, :n].all() and (idx[b, p, h, n:] == -1).all()
        chosen = idx[b, p, h, :n]
        assert (np.diff(chosen) > 0).all()
        assert elig[chosen].all()
        assert forced <= set(chosen.tolist())
        rest = sorted(set(doc_blocks) - forced, key=lambda j: (-scores[b, p, h, j], j))
        assert set(chosen.tolist()) == forced | set(rest[:n - len(forced)])


def test_select_blocks_hand_made_scores_and_ties():
  """Query at 90 (block 5): init 0 and local 4, 5 are forced; block 2 (0.9) then the 0.5 tie
  between blocks 1 and 3, broken towards block 1; block 6 is future even with the best score."""
  cfg = dataclasses.replace(SMALL, topk=5)
  scores = np.zeros((1, 1, 1, 7), np.float32)
  scores[..., :] = [0.0, 0.5, 0.9, 0.5, 0.1, 0.0, 99.0]
  idx, valid = select_blocks(jnp.asarray(scores), cfg, q_len=1, kv_len=112, q_start=jnp.array([90]))
  np.testing.assert_array_equal(idx[0, 0, 0], [0, 1, 2, 4, 5])
  assert bool(valid.all())
  equal = np.ones((1, 1, 2, 7), np.float32)
  idx, _ = select_blocks(jnp.asarray(equal), cfg, q_len=1, kv_len=112, q_start=jnp.array([90]))
  np.testing.assert_array_equal(idx[0, 0], [[0, 1, 2, 4, 5]] * 2)
  nan = np.full((1, 1, 1, 7), np.nan, np.float32)
  nan[..., 3] = 0.2
  idx, _ = select_blocks(jnp.asarray(nan), cfg, q_len=1, kv_len=112, q_start=jnp.array([90]))
  np.testing.assert_array_equal(idx[0, 0, 0], [0, 1, 3, 4, 5])  # NaN ranks below any number


def test_select_blocks_init_is_the_start_of_the_query_document():
  """In a packed row the init block is the first block of the query's own document, and blocks
  holding only other documents are never selected, whatever their score."""
  seg = np.array([[1] * 40 + [2] * 72], np.int32)  # document 2 starts inside block 2
  scores = np.zeros((1, 112, 1, 7), np.float32)
  scores[..., 0] = 100.0
  scores[..., 1] = 50.0
  idx, valid = select_blocks(jnp.asarray(scores), dataclasses.replace(SMALL, topk=4), q_len=112,
                             kv_len=112, segment_ids=jnp.asarray(seg))
  np.testing.assert_array_equal(idx[0, 111, 0], [2, 3, 5, 6])  # init 2, local 5-6, best other 3
  assert not np.isin(np.asarray(idx)[0, 40:], [0, 1]).any()
  np.testing.assert_array_equal(idx[0, 20, 0], [0, 1, -1, -1])  # doc 1, two blocks eligible
  assert int(valid[0, 20, 0].sum()) == 2


def test_select_blocks_more_slots_than_blocks():
  """topk larger than the number of blocks: the output keeps topk slots, the extra ones invalid."""
  cfg = dataclasses.replace(SMALL, topk=12)
  idx, valid = select_blocks(jnp.zeros((1, 40, 1, 3)), cfg, q_len=40, kv_len=40)
  assert idx.shape == (1, 40, 1, 12)
  np.testing.assert_array_equal(idx[0, 39, 0, :4], [0, 1, 2, -1])
  assert int(valid[0, 39].sum()) == 3


# ---------------------------------------------------------------------------------------------
# Sparse attention


def pipeline(q, k, v, cfg, **kw):
  scores = block_scores(q, k, cfg, **kw)
  idx, valid = select_blocks(scores, cfg, q_len=q.shape[1], kv_len=k.shape[1],
                             q_start=kw.get("q_start"), segment_ids=kw.get("segment_ids"),
                             kv_segment_ids=kw.get("kv_segment_ids"))
  return idx, valid


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (16, 1)])
def test_full_coverage_equals_dense_attention(num_heads, num_kv_heads):
  """topk covering every block: sparse == dense on ragged packed rows (batch 2, padding)."""
  t = 77
  q, k, v = (jnp.asarray(x) for x in rand_qkv(num_heads, 2, t, num_heads, num_kv_heads, 8))
  seg = jnp.asarray(packed_segments(t))
  cfg = full_cover(SMALL, t)
  idx, valid = pipeline(q, k, v, cfg, segment_ids=seg)
  out = sparse_attention(q, k, v, idx, valid, cfg, segment_ids=seg)
  ref = dense_attention(q, k, v, segment_ids=seg, implementation="xla")
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  out = sparse_attention(q, k, v, *pipeline(q, k, v, cfg), cfg)  # no segments
  np.testing.assert_allclose(out, dense_attention(q, k, v, implementation="xla"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (16, 1)])
def test_full_coverage_decode_equals_dense_attention(num_heads, num_kv_heads):
  """q_len=1 against a longer cache (q_start = cache length, kv_lengths), packed documents."""
  cap = 96
  q, k, v = (jnp.asarray(x) for x in rand_qkv(3, 2, 1, num_heads, num_kv_heads, 8, kv_len=cap))
  lengths = jnp.array([71, 50])
  kv_seg = np.zeros((2, cap), np.int32)
  kv_seg[0, :30], kv_seg[0, 30:71], kv_seg[1, :50] = 1, 2, 1
  seg = jnp.array([[2], [1]], jnp.int32)
  kw = dict(segment_ids=seg, kv_segment_ids=jnp.asarray(kv_seg), q_start=lengths - 1,
            kv_lengths=lengths)
  cfg = full_cover(SMALL, cap)
  out = sparse_attention(q, k, v, *pipeline(q, k, v, cfg, **kw), cfg, **kw)
  np.testing.assert_allclose(out, dense_attention(q, k, v, implementation="xla", **kw),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (16, 1)])
def test_sparse_attention_matches_float64_masked_softmax(num_heads, num_kv_heads):
  """topk below the block count: output and lse equal a float64 softmax over
  attention_mask & visible_mask (the visible set is exactly the selected blocks)."""
  t = 110
  qn, kn, vn = rand_qkv(11, 2, t, num_heads, num_kv_heads, 8)
  q, k, v = jnp.asarray(qn), jnp.asarray(kn), jnp.asarray(vn)
  seg = jnp.asarray(packed_segments(t))
  cfg = dataclasses.replace(SMALL, topk=4)
  idx, valid = pipeline(q, k, v, cfg, segment_ids=seg)
  assert int(valid.sum(-1).max()) == 4 and -(-t // 16) == 7  # really sparse
  out, lse = sparse_attention(q, k, v, idx, valid, cfg, segment_ids=seg, return_lse=True)
  mask = (np.asarray(attention_mask(t, t, batch=2, segment_ids=seg))[:, :, None, :]
          & np.asarray(visible_mask(idx, valid, cfg, kv_len=t)))
  ref_out, ref_lse = np_masked_attention(qn, kn, vn, mask)
  assert out.dtype == q.dtype and lse.dtype == jnp.float32 and lse.shape == (2, t, num_heads)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_visible_mask_expands_selected_blocks():
  """Key j is visible iff its block j // B is a valid selected block; ragged tail truncated."""
  idx = jnp.array([[[[0, 2, 5]]]], jnp.int32)
  valid = jnp.array([[[[True, True, False]]]])
  mask = np.asarray(visible_mask(idx, valid, SMALL, kv_len=50))[0, 0, 0]
  expected = np.zeros(50, bool)
  expected[0:16] = expected[32:48] = True
  np.testing.assert_array_equal(mask, expected)


def masked_reference_jnp(q, k, v, mask):
  """The same attention written as a plain masked dense softmax in jnp (for gradients)."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("btnd,bsnd->btns", q, kk) / math.sqrt(d)
  logits = jnp.where(jnp.repeat(mask, g, axis=2), logits, -1e30)
  return jnp.einsum("btns,bsnd->btnd", jax.nn.softmax(logits, axis=-1), vv)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (16, 1)])
def test_gradients_match_masked_dense(num_heads, num_kv_heads):
  """d/dq, d/dk, d/dv of the sparse attention are finite and equal those of an explicit masked
  dense softmax with the same visible set (block selection itself is not differentiated)."""
  t = 70
  q, k, v = (jnp.asarray(x) for x in rand_qkv(13, 2, t, num_heads, num_kv_heads, 8))
  seg = jnp.asarray(packed_segments(t))
  idx, valid = pipeline(q, k, v, SMALL, segment_ids=seg)
  mask = attention_mask(t, t, batch=2, segment_ids=seg)[:, :, None, :] & visible_mask(
      idx, valid, SMALL, kv_len=t)
  cot = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape).astype(np.float32))
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * cot))
  sparse = lambda q, k, v: sparse_attention(q, k, v, idx, valid, SMALL, segment_ids=seg)
  grads = jax.jit(jax.grad(loss(sparse), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.jit(jax.grad(loss(lambda q, k, v: masked_reference_jnp(q, k, v, mask)),
                         argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads, ref):
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The full method


def test_infllmv2_attention_switches_on_dense_len():
  """Below dense_len: dense attention; at or above: the sparse pipeline (strict <, as the
  reference); with kv_lengths the switch is per row on the filled length. Works under jit."""
  t = 100
  q, k, v = (jnp.asarray(x) for x in rand_qkv(17, 2, t, 4, 2, 8))
  dense = dense_attention(q, k, v, implementation="xla")
  cfg = dataclasses.replace(SMALL, topk=3, dense_len=t + 1)
  np.testing.assert_array_equal(infllmv2_attention(q, k, v, cfg), dense)
  cfg = dataclasses.replace(cfg, dense_len=t)
  out = infllmv2_attention(q, k, v, cfg)
  sparse = sparse_attention(q, k, v, *pipeline(q, k, v, cfg), cfg)
  np.testing.assert_allclose(out, sparse, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(sparse - dense).max()) > 1e-3  # topk=3 of 7 blocks really is sparse

  lengths = jnp.array([t, 60])
  kw = dict(q_start=jnp.array([0, 0]), kv_lengths=lengths)
  mixed = infllmv2_attention(q, k, v, dataclasses.replace(cfg, dense_len=80), **kw)
  np.testing.assert_allclose(mixed[0], sparse_attention(q, k, v, *pipeline(q, k, v, cfg, **kw), cfg,
                                                        **kw)[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mixed[1], dense_attention(q, k, v, implementation="xla", **kw)[1])


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("overrides,needle", [
    (dict(block_size=40), "block_size"),
    (dict(compress_window=24, compress_stride=16), "compress_window"),
    (dict(topk=32), "topk"),
    (dict(local_blocks=0), "local_blocks"),
    (dict(lse_window=100), "lse_window"),
    (dict(init_blocks=-1), "init_blocks"),
])
def test_config_rejects_bad_values(overrides, needle):
  """Bad hyper-parameters fail at construction, naming the field."""
  with pytest.raises(ValueError, match=needle):
    InfLLMv2Config(**overrides)


def test_ops_reject_bad_inputs_naming_the_argument():
  """Shape and type errors name the offending argument instead of failing deep inside jnp."""
  q, k, v = (jnp.asarray(x) for x in rand_qkv(0, 2, 40, 4, 2, 8))
  idx, valid = pipeline(q, k, v, SMALL)
  with pytest.raises(ValueError, match="k must be 4-D"):
    compress_keys(k[0], window=8, stride=4)
  with pytest.raises(ValueError, match="stride"):
    compress_keys(k, window=8, stride=0)
  with pytest.raises(ValueError, match="segment_ids"):
    block_scores(q, k, SMALL, segment_ids=jnp.ones((2, 39), jnp.int32))
  with pytest.raises(ValueError, match="num_heads"):
    block_scores(q[:, :, :3], k, SMALL)
  with pytest.raises(ValueError, match="kv_len"):
    select_blocks(jnp.zeros((2, 40, 2, 3)), SMALL, q_len=40, kv_len=70)
  with pytest.raises(ValueError, match="block_idx"):
    sparse_attention(q, k, v, idx[:, :, :1], valid[:, :, :1], SMALL)
  with pytest.raises(ValueError, match="block_valid"):
    sparse_attention(q, k, v, idx, valid.astype(jnp.int32), SMALL)
  with pytest.raises(ValueError, match="cfg"):
    infllmv2.infllmv2_attention(q, k, v, {"topk": 4})
  with pytest.raises(ValueError, match="q_start"):
    infllmv2.infllmv2_attention(q, k, v, SMALL, q_start=jnp.zeros(3, jnp.int32))
