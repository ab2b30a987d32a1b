"""The fused InfLLM-V2 block-scoring kernel (Pallas, interpret mode on the CPU) against the jnp
reference: ragged lengths, GQA 1/2/3/16, batch 2, packed documents, the exact and approximate
normalisers, other window/stride/block geometries, and the selection built on it."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_scores import block_scores, score_and_select
from pallas_kernels.block_topk import merge_tail
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


@pytest.mark.parametrize("seq,heads,kv_heads,init,local,approx", [
    (100, 4, 2, 1, 1, False),   # ragged
    (150, 6, 2, 2, 3, True),    # GQA 3, two init blocks, three local ones
    (64, 16, 1, 1, 2, False),   # a whole number of blocks
])
def test_ranking_keys_match_reference(seq, heads, kv_heads, init, local, approx):
  """The kernel's epilogue writes `selection_keys` (forced +inf, future -inf) of its scores."""
  cfg = dataclasses.replace(CFG, init_blocks=init, local_blocks=local, topk=init + local + 1,
                            approximate_lse=approx)
  q, k = inputs(seq + init, 2, seq, heads, kv_heads, 16)
  want = ref_ops.selection_keys(ref_ops.block_scores(q, k, cfg), cfg, q_len=seq, kv_len=seq)
  got = block_scores(q, k, cfg, implementation="interpret", ranking_keys=True, block_rows=32)
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  reference = block_scores(q, k, cfg, implementation="reference", ranking_keys=True)
  np.testing.assert_array_equal(reference, want)


@pytest.mark.parametrize("heads,kv_heads,approx,ranking", [
    (4, 2, False, False),   # GQA 2, exact normaliser
    (6, 2, True, True),     # GQA 3 (padded heads), coarse normaliser, ranking keys
    (16, 1, False, True),   # GQA 16, ranking keys
])
def test_tiles_seen_whole_skip_the_mask(heads, kv_heads, approx, ranking):
  """Tiles of 16 windows (64 tokens) over 300 tokens: most tiles lie wholly before a program's
  first query and run without the visibility mask; the scores must not change."""
  cfg = dataclasses.replace(CFG, approximate_lse=approx, init_blocks=1, local_blocks=2, topk=4)
  q, k = inputs(heads + 7, 2, 300, heads, kv_heads, 16)
  want = ref_ops.block_scores(q, k, cfg)
  if ranking:
    want = ref_ops.selection_keys(want, cfg, q_len=300, kv_len=300)
  got = block_scores(q, k, cfg, implementation="interpret", ranking_keys=ranking, block_rows=32,
                     block_windows=16)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,stride", [(8, 4), (4, 4)])
def test_unmerged_outputs_merge_to_the_scores(window, stride):
  """merged=False gives the kernel's (own, tail) maxima; merge_tail of them is the result (no
  tail when windows do not overlap)."""
  cfg = dataclasses.replace(CFG, compress_window=window, compress_stride=stride)
  q, k = inputs(11, 1, 150, 4, 2, 16)
  own, tail = block_scores(q, k, cfg, implementation="interpret", block_rows=32, merged=False)
  assert (tail is None) == (window == stride)
  merged = own if tail is None else merge_tail(own, tail)
  np.testing.assert_allclose(merged, ref_ops.block_scores(q, k, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk_implementation", ["reference", "interpret"])
def test_selection_of_one_document_rows(topk_implementation):
  """Without segment ids the selection comes from the kernel's ranking keys."""
  q, k = inputs(5, 2, 140, 8, 2, 16)
  cfg = dataclasses.replace(CFG, topk=4, local_blocks=2)
  want = ref_ops.select_blocks(ref_ops.block_scores(q, k, cfg), cfg, q_len=140, kv_len=140)
  got = score_and_select(q, k, cfg, implementation="interpret", block_rows=32,
                         topk_implementation=topk_implementation)
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
  with pytest.raises(ValueError, match="ranking_keys"):
    block_scores(q, k, CFG, segment_ids=jnp.ones((1, 64), jnp.int32), ranking_keys=True)
  with pytest.raises(ValueError, match="power of two"):
    block_scores(q, k, dataclasses.replace(CFG, block_size=12, compress_window=4,
                                           compress_stride=4),
                 implementation="interpret")


# ---------------------------------------------------------------------------------------------
# Decode: selection keys of one query token per row from the cached compressed keys.

from pallas_kernels.block_scores.decode import (decode_selection_keys, default_splits,  # noqa: E402
                                                select_and_attend_forced, select_decode_blocks)
from pallas_kernels.infllmv2_decode import infllmv2_decode, resolve_forced_splits  # noqa: E402

DECODE_CASES = [  # batch, kv_len, heads, kv_heads, packed, approximate_lse, splits, block_windows
    (3, 200, 4, 2, False, False, None, 16),  # ragged cache: 12.5 blocks
    (2, 333, 16, 1, True, True, 4, 16),      # GQA 16, documents, coarse normaliser, 4 splits
    (3, 256, 2, 2, True, False, 1, 32),      # GQA 1, one split, 8-block tiles
    (2, 190, 6, 2, False, True, 2, 16),      # GQA 3 (heads padded), approximate
    (2, 2100, 4, 2, True, False, 4, 16),     # 132 blocks: rows 8x wider than the top-k's slots
]


def _decode_inputs(seed, batch, kv_len, heads, kv_heads, is_packed, cfg):
  q, k = inputs(seed, batch, kv_len, heads, kv_heads, 16)
  q = q[:, :1]
  rng = np.random.default_rng(seed)
  # Rows at different positions: one near the start (little or nothing visible), one at the end.
  q_start = jnp.asarray(np.r_[kv_len - 1, rng.integers(kv_len // 2, kv_len), 5,
                              rng.integers(20, kv_len, size=batch)][:batch], jnp.int32)
  kc = ref_ops.compress_keys(k, window=cfg.compress_window, stride=cfg.compress_stride)
  kc2 = ref_ops.compress_keys(k, window=cfg.lse_window, stride=cfg.lse_stride)
  seg = kv_seg = None
  if is_packed:
    kv_seg = packed(batch, kv_len, seed)
    # The query's own document, as in a cache: the segment of its position.
    seg = jnp.take_along_axis(kv_seg, q_start[:, None], axis=1)
    # A row whose document began 10 tokens before the query, with two runs of 12 tokens far
    # back (ids may repeat): no coarse window is visible, but fine windows in unforced blocks
    # (past the init blocks 2 and 3) are, so their keys need the exact normaliser's fallback.
    kv_seg = kv_seg.at[0, kv_len - 10:].set(99).at[0, 40:52].set(99).at[0, 70:82].set(99)
    seg = seg.at[0, 0].set(99)
    # A row whose document spans every split: its init blocks (1, 2) are in the first split
    # only, so the later splits must count the eligible blocks before them.
    kv_seg = kv_seg.at[1, :20].set(7).at[1, 20:].set(8)
    seg = seg.at[1, 0].set(8)
  return q, kc, kc2, q_start, seg, kv_seg


@pytest.mark.parametrize("batch,kv_len,heads,kv_heads,is_packed,approx,splits,block_windows",
                         DECODE_CASES)
def test_decode_keys_match_reference(batch, kv_len, heads, kv_heads, is_packed, approx, splits,
                                     block_windows):
  cfg = dataclasses.replace(CFG, approximate_lse=approx, local_blocks=2, init_blocks=2, topk=6)
  q, kc, kc2, q_start, seg, kv_seg = _decode_inputs(kv_len, batch, kv_len, heads, kv_heads,
                                                    is_packed, cfg)
  kw = dict(kv_len=kv_len, q_start=q_start, kc_coarse=kc2 if approx else None, segment_ids=seg,
            kv_segment_ids=kv_seg)
  want = decode_selection_keys(q, kc, cfg, implementation="reference", **kw)
  got = decode_selection_keys(q, kc, cfg, implementation="interpret", splits=splits,
                              block_windows=block_windows, **kw)
  n_blocks = want.shape[-1]
  assert got.shape[:3] == want.shape[:3] and got.shape[-1] >= n_blocks
  assert np.all(np.isneginf(np.asarray(got[..., n_blocks:])))   # padding columns
  got, want = np.asarray(got[..., :n_blocks]), np.asarray(want)
  np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))   # forced blocks
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))   # ineligible blocks
  finite = np.isfinite(want)
  assert finite.any()
  np.testing.assert_allclose(got[finite], want[finite], rtol=2e-5, atol=2e-6)
  # ... and the top-k over them picks the same blocks.
  for a, b in zip(ref_ops.top_blocks(jnp.asarray(got), cfg.topk),
                  ref_ops.top_blocks(jnp.asarray(want), cfg.topk)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch,kv_len,heads,kv_heads,is_packed,approx,splits,block_windows",
                         DECODE_CASES)
def test_decode_selection_in_the_scores_kernel_matches_reference(
    batch, kv_len, heads, kv_heads, is_packed, approx, splits, block_windows):
  """select_decode_blocks with the top-k in the scores kernel's last split: the reference's
  blocks (the dense fallback below dense_len included), then -1 columns, in outputs that start
  as garbage (interpret mode: INT_MIN)."""
  # dense_len between the rows' positions: rows 0 (and 1) select, a row 2 (q_start 5) is dense;
  # at 150 the dense rows need more slots (10) than topk.
  for dense_len in (20, 150):
    cfg = dataclasses.replace(CFG, approximate_lse=approx, local_blocks=2, init_blocks=2, topk=6,
                              dense_len=dense_len)
    q, kc, kc2, q_start, seg, kv_seg = _decode_inputs(kv_len, batch, kv_len, heads, kv_heads,
                                                      is_packed, cfg)
    kw = dict(kv_len=kv_len, q_start=q_start, kc_coarse=kc2 if approx else None,
              segment_ids=seg, kv_segment_ids=kv_seg)
    want_idx, want_valid = ref_ops.select_decode_blocks(q, kc, cfg, **kw)
    got_idx, got_valid = select_decode_blocks(q, kc, cfg, implementation="interpret",
                                              splits=splits, block_windows=block_windows, **kw)
    width = want_idx.shape[-1]
    assert got_idx.shape[:3] == want_idx.shape[:3] and got_idx.shape[-1] >= width
    np.testing.assert_array_equal(np.asarray(got_idx[..., width:]), -1)
    np.testing.assert_array_equal(np.asarray(got_idx[..., :width]), np.asarray(want_idx))
    np.testing.assert_array_equal(np.asarray(got_valid[..., :width]), np.asarray(want_valid))
    counts = np.asarray(want_valid).sum(-1)
    assert counts.max() >= cfg.topk                               # some rows selected
    if batch > 2:                                                 # the dense row's few blocks
      assert counts.min() < cfg.topk


@pytest.mark.parametrize("batch,kv_len,heads,kv_heads,is_packed,approx,splits,block_windows",
                         DECODE_CASES)
def test_decode_step_with_forced_blocks_attended_by_the_scores_kernel(
    batch, kv_len, heads, kv_heads, is_packed, approx, splits, block_windows):
  """pallas_kernels.infllmv2_decode (the scores kernel attends the forced blocks, sparse_decode
  the selected rest and merges) equals the reference decode step: rows that select and a dense
  row, init blocks by document (a document that starts inside the local window: its init blocks
  are local ones), 1 or 3 forced programs a row."""
  for dense_len in (20, 150):
    cfg = dataclasses.replace(CFG, approximate_lse=approx, local_blocks=2, init_blocks=2, topk=6,
                              dense_len=dense_len)
    q, _, _, q_start, seg, kv_seg = _decode_inputs(kv_len, batch, kv_len, heads, kv_heads,
                                                   is_packed, cfg)
    _, k = inputs(kv_len + 1, batch, kv_len, heads, kv_heads, 16)
    _, v = inputs(kv_len + 2, batch, kv_len, heads, kv_heads, 16)
    kc = ref_ops.compress_keys(k, window=cfg.compress_window, stride=cfg.compress_stride)
    kc2 = ref_ops.compress_keys(k, window=cfg.lse_window, stride=cfg.lse_stride)
    kw = dict(q_start=q_start, kc_coarse=kc2 if approx else None, segment_ids=seg,
              kv_segment_ids=kv_seg)
    want = ref_ops.infllmv2_decode(q, k, v, kc, cfg, **kw)
    for forced_splits in (1, 3) if kv_len == 200 else (3,):
      got = infllmv2_decode(q, k, v, kc, cfg, implementation="interpret",
                            forced_splits=forced_splits, keys_splits=splits,
                            block_windows=block_windows, **kw)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_decode_keys_bad_inputs_are_named():
  q, kc, _, q_start, _, _ = _decode_inputs(0, 2, 64, 4, 2, False, CFG)
  with pytest.raises(ValueError, match="implementation must be one of"):
    decode_selection_keys(q, kc, CFG, kv_len=64, q_start=q_start, implementation="cuda")
  with pytest.raises(ValueError, match="one token"):
    decode_selection_keys(jnp.concatenate([q, q], 1), kc, CFG, kv_len=64, q_start=q_start)
  with pytest.raises(ValueError, match="both segment_ids and kv_segment_ids"):
    decode_selection_keys(q, kc, CFG, kv_len=64, q_start=q_start,
                          segment_ids=jnp.ones((2, 1), jnp.int32))
  with pytest.raises(ValueError, match="kc must be"):
    decode_selection_keys(q, kc[:, :-1], CFG, kv_len=64, q_start=q_start)
  with pytest.raises(ValueError, match="block_windows must be"):
    decode_selection_keys(q, kc, CFG, kv_len=64, q_start=q_start, block_windows=24)
  with pytest.raises(ValueError, match="splits must be None or a power of two"):
    decode_selection_keys(q, kc, CFG, kv_len=64, q_start=q_start, splits=3)
  k = v = jnp.zeros((2, 64, 2, 16))
  forced = functools.partial(select_and_attend_forced, q, k, v, kc, q_start=q_start,
                             implementation="interpret")
  with pytest.raises(ValueError, match="forced_splits must be >= 1"):
    forced(CFG, forced_splits=0)
  with pytest.raises(ValueError, match="needs a kernel implementation"):
    select_and_attend_forced(q, k, v, kc, CFG, q_start=q_start, forced_splits=2,
                             implementation="reference")
  with pytest.raises(ValueError, match="k and v must be"):
    select_and_attend_forced(q, k, v[:, :32], kc, CFG, q_start=q_start, forced_splits=2)
  with pytest.raises(ValueError, match="forced_splits must be None or an int"):
    infllmv2_decode(q, k, v, kc, CFG, q_start=q_start, forced_splits=-1)


def test_resolve_forced_splits():
  """The forced-program count infllmv2_decode launches (and bench rows report): about 128
  programs in all by default, at least one and at most one per forced block."""
  assert resolve_forced_splits(8, 2, CFG) == min(8, CFG.init_blocks + CFG.local_blocks)
  assert resolve_forced_splits(1, 1, CFG) == CFG.init_blocks + CFG.local_blocks
  assert resolve_forced_splits(64, 4, CFG) == 1
  assert resolve_forced_splits(8, 2, CFG, 5) == 5
  assert resolve_forced_splits(8, 2, CFG, 0) == 0
  local_only = dataclasses.replace(CFG, init_blocks=0, local_blocks=3)
  assert resolve_forced_splits(8, 2, local_only) == 3
  with pytest.raises(ValueError, match="forced_splits must be None or an int"):
    resolve_forced_splits(8, 2, CFG, True)


def test_decode_default_splits_are_powers_of_two():
  """The GPU run at batch 3 x 4 KV heads once chose 10 splits, which the Triton lowering
  rejects; the default rounds down to a power of two, at most one split per tile."""
  assert default_splits(3, 4, 64) == 32
  assert default_splits(8, 2, 1024) == 32
  assert default_splits(8, 2, 16) == 16
  assert default_splits(1, 1, 4) == 4
  assert default_splits(64, 8, 64) == 1
