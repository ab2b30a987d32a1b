"""InfLLM-V2 trainable sparse attention: the pure-jnp reference semantics.

InfLLM-V2 (arXiv 2509.24663; MiniCPM4) adds no parameters. Every query token attends, per KV head,
to a set of 64-token key blocks: the first `init_blocks` blocks of its document, the `local_blocks`
blocks ending at its own block, and the best-scoring other blocks, `topk` blocks in all. Blocks are
scored from the same q and k the attention uses:

  stage 1  k is mean-pooled over windows of `compress_window` tokens every `compress_stride` tokens
           (compressed keys). Each query head takes a softmax (scale 1/sqrt(head_dim)) over the
           compressed keys it may see: a window is visible when its last token is at or before the
           query (the whole window lies in the past), it lies inside the filled cache (kv_lengths)
           and all its tokens carry the query's segment id (no window straddles two documents, no
           window leaks another document). A query that sees no window gets all-zero scores.
  stage 2  the per-head probabilities are summed over the query heads of each KV group, so all the
           heads of a group select the same blocks.
  stage 3  block j scores the max over the compressed windows that overlap its tokens
           [j*B, (j+1)*B). For B = block_size, l = compress_window, s = compress_stride this is a
           1-D max-pool over the compressed axis with kernel B/s + l/s - 1, stride B/s and padding
           l/s - 1 (kernel 5, stride 4, padding 1 at 64/32/16; see `pool_geometry`). Windows that
           are not visible contribute 0 (their probability); a block no window overlaps scores 0.

`select_blocks` then forces the init and local blocks, excludes every block after the query's own
block and every block holding none of the query's document, and fills the remaining slots with the
highest-scoring eligible blocks (ties: lower block index first); `sparse_attention` attends to the
union of the selected blocks intersected with the usual causal / segment / kv_lengths mask of
`sparsejax.ops.attention.attention_mask`. `infllmv2_attention` switches between dense attention
(kv_len < dense_len) and the sparse path. Selection is discrete: no gradient flows through the block
scores (the reference computes them under torch.no_grad); q, k, v get gradients through the sparse
attention itself, which is how the "semantic kernels" are trained indirectly.

What the public reference code does (read, not copied), and where it differs from the paper:
  * Key compression: OpenBMB/infllmv2_cuda_impl tests/test_stage1_compressed_lse.py
    (`calc_chunks_with_stride` + `compress_tensor`) and the CompressK module of the MiniCPM4 Hugging
    Face modeling file (`MiniCPMInfLLMv2Attention`; I read copies of it in public forks, not the
    openbmb upload itself): only full windows, c = (t - l) // s + 1 of them, plain mean, computed
    per varlen sequence (windows restart at every document). Same here, except that a packed row is
    compressed as one sequence and windows that cross a document boundary are masked out instead of
    being re-aligned to the document start.
  * Compressed-level causality: infllmv2_cuda_impl tests/test_stage1.py (`naive_attention`) masks
    compressed key j for query i unless i >= 16*j + 31, i.e. the window [16j, 16j+32) ends at or
    before i: the paper's rule, implemented here. Masked entries get probability 0 and NaN rows
    (nothing visible) become 0, as here. During decoding the model file runs stage 1 with
    causal=False over the compressed cache, which holds only complete windows: the same rule.
  * GQA combination: tests/test_stage1.py sums the softmax probabilities over the 16 query heads of
    each KV head (`reshape(2, 16, ...).sum(dim=1)`); the README calls it "hdim16_reduce". The paper
    allows sum or mean; sum here (it does not change the ranking).
  * Max-pool: infllm_v2/max_pooling_1d.py hard-codes kernel = block_size/stride + 1, stride =
    block_size/stride, padding 1. That equals the overlap rule above only when l = 2s (the shipped
    32/16); this module derives it from the overlap, so other window/stride pairs stay meaningful.
    csrc/max_pooling_1d.cuh writes -inf for a block whose pooling range is empty; 0 here (such a
    block is always the query's own block, which is forced).
  * Forced blocks: csrc/max_pooling_1d.cuh (and the `transform_score` Triton reference in
    tests/test_pooling_comparison.py) set the first init_blocks blocks to +inf, but the local blocks
    (query block - local_blocks < j <= query block) to -inf, i.e. they are pushed OUT of the top-k;
    the attention kernel covers them with a sliding block window instead (`block_window_size` in
    csrc/flash_attn/src/flash_blockmask.h; CPM.cu ships sink_window_size=1, block_window_size=32,
    sparse_topk_k=64). Future blocks are not masked before the top-k; afterwards every index past
    the query's block is replaced by -1 (`topk_idx[topk_idx > q_idx] = -1` in `compressed_attention`
    of the model file), so a future block can waste a slot. The paper (and this module) force the
    local blocks (+inf) and exclude the future (-inf) before the top-k; the attended set is the same
    "init + local + best others", and no slot is wasted.
  * What top-k counts: the model file sets `self.topk = sparse_config["topk"] + window_size //
    block_size` = 64 + 32 = 96 and the paper reports |I| = 96 = 1 init + 63 top-k + 32 local. So the
    shipped `topk: 64` counts the init block but not the 32 local blocks. Here `topk` is the TOTAL per
    query and KV head, forced blocks included, and defaults to 96 to select the same number of
    blocks as the released checkpoint (64 + 32).
  * LSE approximation: infllmv2_attn_stage1(q, k1, k2) takes the fine compressed keys (32/16) and
    coarse ones (128/64); tests/stage1/complse_online_softmax.py shows pass one computing the row max
    and log-sum-exp over the coarse keys and pass two writing exp(q.k1 * scale - lse_coarse) for the
    fine keys. That is `approximate_lse=True` here: score = exp(logit - LSE_coarse), LSE_coarse over
    the coarse windows visible to the query (same visibility rule). The scores are no longer
    normalised (mean-pooling over 128 tokens flattens the logits and there are ~4x fewer coarse keys,
    so they come out larger, mostly by a per-(query, head) factor); only the head weighting inside
    the group sum changes, never the ranking within one head. A query that sees fine windows but no
    coarse one (its position is below lse_window - 1) uses the exact normaliser (the reference's
    online-softmax test would divide by zero there).
  * Dense/sparse switch: the model file runs dense when kv_seq_len < dense_len (strict), sparse
    otherwise; same here, on k.shape[1], refined per row by kv_lengths when given.

Shapes follow `sparsejax.ops.attention`: q [batch, q_len, num_heads, head_dim]; k, v
[batch, kv_len, num_kv_heads, head_dim]; query head n belongs to KV head n // (num_heads //
num_kv_heads); query t sits at key position q_start + t; segment id 0 marks padding.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.ops.attention import attention_mask, dense_attention


@dataclasses.dataclass(frozen=True)
class InfLLMv2Config:
  """Static hyper-parameters of InfLLM-V2 (defaults: MiniCPM4 `sparse_config`)."""
  block_size: int = 64          # selection block B (tokens)
  compress_window: int = 32     # l: compressed-key window
  compress_stride: int = 16     # s: compressed-key stride
  init_blocks: int = 1          # first blocks of the query's document, always selected
  local_blocks: int = 32        # blocks ending at the query's own block, always selected (2048 tokens)
  topk: int = 96                # total blocks per query and KV head, init + local included (64 + 32)
  lse_window: int = 128         # coarse keys for the LSE approximation
  lse_stride: int = 64
  approximate_lse: bool = False
  dense_len: int = 8192         # kv_len < dense_len runs dense attention

  def __post_init__(self):
    positive = ("block_size", "compress_window", "compress_stride", "local_blocks", "topk",
                "lse_window", "lse_stride")
    for name in positive + ("init_blocks", "dense_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"InfLLMv2Config: {name} must be an int, got {value!r}")
    for name in positive:
      if getattr(self, name) < 1:
        # local_blocks >= 1 keeps every query's own block selected, so no query is left blind.
        raise ValueError(f"InfLLMv2Config: {name} must be >= 1, got {getattr(self, name)}")
    for name in ("init_blocks", "dense_len"):
      if getattr(self, name) < 0:
        raise ValueError(f"InfLLMv2Config: {name} must be >= 0, got {getattr(self, name)}")
    if self.block_size % self.compress_stride:
      raise ValueError(
          f"InfLLMv2Config: block_size={self.block_size} must be a multiple of "
          f"compress_stride={self.compress_stride}")
    if self.compress_window % self.compress_stride:
      raise ValueError(
          f"InfLLMv2Config: compress_window={self.compress_window} must be a multiple of "
          f"compress_stride={self.compress_stride}")
    if self.lse_window % self.lse_stride:
      raise ValueError(
          f"InfLLMv2Config: lse_window={self.lse_window} must be a multiple of "
          f"lse_stride={self.lse_stride}")
    if self.topk < self.init_blocks + self.local_blocks:
      raise ValueError(
          f"InfLLMv2Config: topk={self.topk} must be >= init_blocks + local_blocks = "
          f"{self.init_blocks + self.local_blocks} (the forced blocks must fit)")
    if not isinstance(self.approximate_lse, bool):
      raise ValueError(f"InfLLMv2Config: approximate_lse must be a bool, got {self.approximate_lse!r}")


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_attention_inputs(fn, q, k, v=None, segment_ids=None, kv_segment_ids=None, q_start=None,
                            kv_lengths=None):
  if q.ndim != 4:
    raise ValueError(f"{fn}: q must be 4-D [batch, q_len, num_heads, head_dim], got shape {q.shape}")
  if k.ndim != 4:
    raise ValueError(f"{fn}: k must be 4-D [batch, kv_len, num_kv_heads, head_dim], got shape {k.shape}")
  if v is not None and v.shape != k.shape:
    raise ValueError(f"{fn}: v must have the shape of k {k.shape}, got {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"{fn}: q{q.shape} and k{k.shape} must agree on batch and head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
        f"{fn}: num_heads={q.shape[2]} (q.shape[2]) must be a multiple of num_kv_heads={k.shape[2]} "
        "(k.shape[2])")
  batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
  _check_segments(fn, batch, q_len, kv_len, segment_ids, kv_segment_ids)
  _check_batch_vector(fn, "q_start", q_start, batch)
  _check_batch_vector(fn, "kv_lengths", kv_lengths, batch)


def _check_segments(fn, batch, q_len, kv_len, segment_ids, kv_segment_ids):
  if segment_ids is not None and tuple(segment_ids.shape) != (batch, q_len):
    raise ValueError(f"{fn}: segment_ids must have shape {(batch, q_len)}, got {tuple(segment_ids.shape)}")
  if kv_segment_ids is not None:
    if segment_ids is None:
      raise ValueError(f"{fn}: kv_segment_ids needs segment_ids (the queries' ids)")
    if tuple(kv_segment_ids.shape) != (batch, kv_len):
      raise ValueError(
          f"{fn}: kv_segment_ids must have shape {(batch, kv_len)}, got {tuple(kv_segment_ids.shape)}")
  elif segment_ids is not None and q_len != kv_len:
    raise ValueError(
        f"{fn}: segment_ids alone needs q_len == kv_len (self-attention); pass kv_segment_ids "
        f"(q_len={q_len}, kv_len={kv_len})")


def _check_batch_vector(fn, name, x, batch):
  if x is not None and jnp.size(x) not in (1, batch):
    raise ValueError(f"{fn}: {name} must be a scalar or a [batch={batch}] array, got shape {jnp.shape(x)}")


def _check_cfg(fn, cfg):
  if not isinstance(cfg, InfLLMv2Config):
    raise ValueError(f"{fn}: cfg must be an InfLLMv2Config, got {type(cfg).__name__}")


def _positions(batch, q_len, q_start):
  """Key-sequence position of every query: int32 [batch, q_len]."""
  pos = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32)[None, :], (batch, q_len))
  if q_start is not None:
    pos = pos + jnp.broadcast_to(jnp.asarray(q_start, jnp.int32).reshape(-1, 1), (batch, 1))
  return pos


# ----------------------------------------------------------------------------------------------
# Stage 1-3: block scores


def num_windows(length: int, window: int, stride: int) -> int:
  """Number of full windows of `window` tokens every `stride` tokens in `length` tokens."""
  return max(0, (length - window) // stride + 1)


def compress_keys(k: jax.Array, *, window: int, stride: int) -> jax.Array:
  """Mean-pool k [b, t, kv_heads, d] over full windows -> [b, c, kv_heads, d] in k.dtype.

  Window i covers tokens [i*stride, i*stride + window); c = max(0, (t - window)//stride + 1): a
  trailing partial window is dropped. The mean is taken in float32.
  """
  if k.ndim != 4:
    raise ValueError(f"compress_keys: k must be 4-D [batch, seq, kv_heads, head_dim], got shape {k.shape}")
  if not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"compress_keys: window must be a positive int, got {window!r}")
  if not isinstance(stride, (int, np.integer)) or stride < 1:
    raise ValueError(f"compress_keys: stride must be a positive int, got {stride!r}")
  c = num_windows(k.shape[1], window, stride)
  idx = np.arange(c)[:, None] * stride + np.arange(window)[None, :]  # [c, window]
  windows = k[:, idx].astype(jnp.float32)  # [b, c, window, kv_heads, d]
  return jnp.mean(windows, axis=2).astype(k.dtype)


def _window_visibility(q_len, kv_len, window, stride, *, batch, q_start, kv_lengths, segment_ids,
                       kv_segment_ids):
  """bool [batch, q_len, c]: compressed window i is visible to query t (see module docstring)."""
  c = num_windows(kv_len, window, stride)
  last = jnp.asarray(np.arange(c) * stride + window - 1, jnp.int32)  # last token of each window
  pos = _positions(batch, q_len, q_start)
  vis = last[None, None, :] <= pos[:, :, None]
  if kv_lengths is not None:
    lengths = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32).reshape(-1), (batch,))
    vis &= last[None, None, :] < lengths[:, None, None]
  if segment_ids is not None:
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    idx = np.arange(c)[:, None] * stride + np.arange(window)[None, :]
    wseg = kv_seg[:, idx]  # [b, c, window]
    uniform = jnp.all(wseg == wseg[:, :, :1], axis=-1)  # the window lies inside one run
    vis &= uniform[:, None, :] & (wseg[:, None, :, 0] == segment_ids[:, :, None])
  return vis


def _group_logits(q, kc):
  """Scaled float32 logits [b, t, kv_heads, group, c] of every query head against kc."""
  b, t, h, d = q.shape
  kvh = kc.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, kvh, h // kvh, d)
  logits = jnp.einsum("btkgd,bckd->btkgc", qg, kc.astype(jnp.float32))
  return logits / np.float32(math.sqrt(d))


def _masked_lse(logits, vis):
  """logsumexp over the visible last axis; -inf for a row that sees nothing."""
  s = jnp.where(vis, logits, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  total = jnp.sum(jnp.exp(s - m), axis=-1)
  return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m[..., 0], -jnp.inf)


def pool_geometry(cfg: InfLLMv2Config) -> tuple[int, int, int]:
  """(kernel, stride, padding) of the max-pool from compressed windows onto selection blocks.

  Window i covers [i*s, i*s + l); block j covers [j*B, (j+1)*B). They overlap iff
  j*B/s - (l/s - 1) <= i <= (j+1)*B/s - 1: a window of B/s + l/s - 1 compressed indices starting at
  j*(B/s) - (l/s - 1). (5, 4, 1) for B=64, l=32, s=16.
  """
  _check_cfg("pool_geometry", cfg)
  ratio, overlap = cfg.block_size // cfg.compress_stride, cfg.compress_window // cfg.compress_stride
  return ratio + overlap - 1, ratio, overlap - 1


def max_pool_blocks(scores_c: jax.Array, cfg: InfLLMv2Config, *, n_blocks: int,
                    empty: float = 0.0) -> jax.Array:
  """Max over the compressed windows overlapping each block: [..., c] -> [..., n_blocks] float32.

  A block that no existing window overlaps (or only windows scored -inf) scores `empty`: 0 for
  InfLLM-V2's probabilities, whose least value it is (the CUDA reference writes -inf).
  """
  _check_cfg("max_pool_blocks", cfg)
  kernel, stride, padding = pool_geometry(cfg)
  c = scores_c.shape[-1]
  idx = np.arange(n_blocks)[:, None] * stride - padding + np.arange(kernel)[None, :]
  idx = np.where((idx >= 0) & (idx < c), idx, c)  # out of range -> the -inf pad column
  pad = jnp.full(scores_c.shape[:-1] + (1,), -jnp.inf, jnp.float32)
  padded = jnp.concatenate([scores_c.astype(jnp.float32), pad], axis=-1)
  pooled = jnp.max(padded[..., idx], axis=-1)
  return jnp.where(jnp.isneginf(pooled), np.float32(empty), pooled)


def block_scores(
    q: jax.Array,
    k: jax.Array,
    cfg: InfLLMv2Config,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_start: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
  """Stage 1-3 block scores: float32 [b, t_q, kv_heads, n_blocks], n_blocks = ceil(kv_len / B).

  No init/local/future forcing here (that is `select_blocks`). With cfg.approximate_lse the softmax
  normaliser of each query head is the logsumexp over the coarse (lse_window, lse_stride) windows it
  may see instead of over the fine ones (exact normaliser when it sees no coarse window).
  """
  _check_cfg("block_scores", cfg)
  _check_attention_inputs("block_scores", q, k, None, segment_ids, kv_segment_ids, q_start, kv_lengths)
  kc = compress_keys(k, window=cfg.compress_window, stride=cfg.compress_stride)
  kc2 = None
  if cfg.approximate_lse:
    kc2 = compress_keys(k, window=cfg.lse_window, stride=cfg.lse_stride)
  return compressed_block_scores(q, kc, cfg, kv_len=k.shape[1], kc_coarse=kc2,
                                 segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                 q_start=q_start, kv_lengths=kv_lengths)


def compressed_block_scores(
    q: jax.Array,
    kc: jax.Array,
    cfg: InfLLMv2Config,
    *,
    kv_len: int,
    kc_coarse: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_start: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
  """`block_scores` from compressed keys computed beforehand (e.g. kept in a KV cache).

  kc [b, num_windows(kv_len, compress_window, compress_stride), kv_heads, d]: `compress_keys` of
  the kv_len keys; kc_coarse (needed iff cfg.approximate_lse) the same at (lse_window,
  lse_stride). Only the visible windows (module docstring) enter the scores, so windows whose
  tokens are not final yet (past kv_lengths, or not yet overwritten padding) may hold anything
  finite. Returns float32 [b, t_q, kv_heads, ceil(kv_len / block_size)].
  """
  fn = "compressed_block_scores"
  _check_cfg(fn, cfg)
  _check_compressed(fn, "kc", kc, q, kv_len, cfg.compress_window, cfg.compress_stride)
  if cfg.approximate_lse:
    if kc_coarse is None:
      raise ValueError(
          f"{fn}: cfg.approximate_lse needs kc_coarse (the lse_window/lse_stride keys)")
    _check_compressed(fn, "kc_coarse", kc_coarse, q, kv_len, cfg.lse_window, cfg.lse_stride)
  b, t_q = q.shape[:2]
  _check_segments(fn, b, t_q, kv_len, segment_ids, kv_segment_ids)
  _check_batch_vector(fn, "q_start", q_start, b)
  _check_batch_vector(fn, "kv_lengths", kv_lengths, b)
  n_blocks = -(-kv_len // cfg.block_size)
  vis_kw = dict(batch=b, q_start=q_start, kv_lengths=kv_lengths, segment_ids=segment_ids,
                kv_segment_ids=kv_segment_ids)

  logits = _group_logits(q, kc)  # [b, t, kvh, g, c]
  vis = _window_visibility(t_q, kv_len, cfg.compress_window, cfg.compress_stride, **vis_kw)
  vis = vis[:, :, None, None, :]
  lse = _masked_lse(logits, vis)  # [b, t, kvh, g]
  if cfg.approximate_lse:
    vis2 = _window_visibility(t_q, kv_len, cfg.lse_window, cfg.lse_stride, **vis_kw)
    lse2 = _masked_lse(_group_logits(q, kc_coarse), vis2[:, :, None, None, :])
    lse = jnp.where(jnp.isfinite(lse2), lse2, lse)
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
  probs = jnp.where(vis, jnp.exp(jnp.where(vis, logits, 0.0) - safe_lse), 0.0)  # stage 1
  grouped = jnp.sum(probs, axis=3)  # stage 2: [b, t, kvh, c]
  return max_pool_blocks(grouped, cfg, n_blocks=n_blocks)  # stage 3


def _check_compressed(fn, name, kc, q, kv_len, window, stride):
  if not isinstance(kv_len, (int, np.integer)) or kv_len < 1:
    raise ValueError(f"{fn}: kv_len must be a positive int, got {kv_len!r}")
  if q.ndim != 4:
    raise ValueError(
        f"{fn}: q must be 4-D [batch, q_len, num_heads, head_dim], got shape {q.shape}")
  c = num_windows(kv_len, window, stride)
  if (kc.ndim != 4 or kc.shape[0] != q.shape[0] or kc.shape[1] != c or kc.shape[3] != q.shape[3]
      or q.shape[2] % kc.shape[2]):
    raise ValueError(
        f"{fn}: {name} must be [batch={q.shape[0]}, num_windows={c} (kv_len={kv_len}, window="
        f"{window}, stride={stride}), kv_heads dividing num_heads={q.shape[2]}, head_dim="
        f"{q.shape[3]}], got shape {kc.shape}")


# ----------------------------------------------------------------------------------------------
# Selection


def select_blocks(
    scores: jax.Array,
    cfg: InfLLMv2Config,
    *,
    q_len: int,
    kv_len: int,
    q_start: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    top_blocks_fn=None,
) -> tuple[jax.Array, jax.Array]:
  """Top-k block selection: (block_idx int32, block_valid bool), both [b, t_q, kv_heads, topk].

  A block j is eligible for the query at position p when j <= p // B (nothing after the query's own
  block) and, with segment ids, it holds at least one key of the query's document. Forced (always
  selected): the first init_blocks eligible blocks (the start of the query's document) and the
  eligible blocks among the local_blocks ending at p // B. The other slots take the eligible blocks
  with the highest scores; equal scores go to the lower block index; NaN scores rank last among the
  eligible. Exactly min(topk, #eligible) slots are valid; the valid indices come first, ascending,
  and the invalid slots hold -1 (never gather with them). It is `top_blocks` of `selection_keys`;
  top_blocks_fn(key, topk) may stand in for `top_blocks` (pallas_kernels/block_topk's kernel).
  """
  key = selection_keys(scores, cfg, q_len=q_len, kv_len=kv_len, q_start=q_start,
                       segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  return (top_blocks_fn or top_blocks)(key, cfg.topk)


def selection_keys(
    scores: jax.Array,
    cfg: InfLLMv2Config,
    *,
    q_len: int,
    kv_len: int,
    q_start: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
  """The ranking key of `select_blocks`: float32 [b, t_q, kv_heads, n_blocks], +inf for a forced
  block, -inf for an ineligible one, otherwise the score (NaN -> the lowest finite float)."""
  fn = "select_blocks"
  _check_cfg(fn, cfg)
  if scores.ndim != 4:
    raise ValueError(f"{fn}: scores must be 4-D [batch, q_len, kv_heads, n_blocks], got shape {scores.shape}")
  b, t_q, kvh, n_blocks = scores.shape
  if t_q != q_len:
    raise ValueError(f"{fn}: q_len={q_len} does not match scores.shape[1]={t_q}")
  if not isinstance(kv_len, (int, np.integer)) or kv_len < 1:
    raise ValueError(f"{fn}: kv_len must be a positive int, got {kv_len!r}")
  if n_blocks != -(-kv_len // cfg.block_size):
    raise ValueError(
        f"{fn}: scores.shape[-1]={n_blocks} must be ceil(kv_len / block_size) = "
        f"{-(-kv_len // cfg.block_size)}")
  _check_segments(fn, b, q_len, kv_len, segment_ids, kv_segment_ids)
  _check_batch_vector(fn, "q_start", q_start, b)

  j = jnp.arange(n_blocks, dtype=jnp.int32)
  q_block = _positions(b, q_len, q_start) // cfg.block_size  # [b, t]
  eligible = eligible_blocks(cfg, batch=b, q_len=q_len, kv_len=kv_len, q_start=q_start,
                             segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  rank = jnp.cumsum(eligible, axis=-1)
  is_init = eligible & (rank <= cfg.init_blocks)
  is_local = eligible & (j[None, None, :] > q_block[:, :, None] - cfg.local_blocks)
  forced = (is_init | is_local)[:, :, None, :]
  eligible4 = eligible[:, :, None, :]

  big = np.finfo(np.float32).max
  finite = jnp.clip(jnp.nan_to_num(scores.astype(jnp.float32), nan=-big), -big, big)
  return jnp.where(forced, jnp.inf, jnp.where(eligible4, finite, -jnp.inf))


def eligible_blocks(cfg: InfLLMv2Config, *, batch: int, q_len: int, kv_len: int,
                    q_start: jax.Array | None = None, segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """bool [batch, q_len, n_blocks]: the blocks a query may select (`select_blocks`): none after
  its own block and, with segment ids, only blocks holding a key of its document."""
  B = cfg.block_size
  n_blocks = -(-kv_len // B)
  j = jnp.arange(n_blocks, dtype=jnp.int32)
  q_block = _positions(batch, q_len, q_start) // B  # [b, t]
  eligible = j[None, None, :] <= q_block[:, :, None]  # [b, t, nb]
  if segment_ids is not None:
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, n_blocks * B - kv_len))).reshape(batch, n_blocks, B)
    exists = jnp.asarray((np.arange(n_blocks * B) < kv_len).reshape(n_blocks, B))
    same_doc = (kv_seg[:, None] == segment_ids[:, :, None, None]) & exists
    eligible &= jnp.any(same_doc, axis=-1)
  return eligible


def top_blocks(key: jax.Array, topk: int) -> tuple[jax.Array, jax.Array]:
  """The `topk` highest keys of every row (ties to the lower index; -inf never taken), as
  (block_idx int32, block_valid bool) [..., topk]: valid slots first, their indices ascending,
  then -1. key [..., n_blocks] float32 without NaN (`selection_keys`)."""
  if not isinstance(topk, (int, np.integer)) or isinstance(topk, bool) or topk < 1:
    raise ValueError(f"top_blocks: topk must be a positive int, got {topk!r}")
  n_blocks = key.shape[-1]
  if n_blocks < topk:  # more slots than blocks: pad with never-eligible columns
    pad = [(0, 0)] * (key.ndim - 1) + [(0, topk - n_blocks)]
    key = jnp.pad(key, pad, constant_values=-jnp.inf)
  # lax.top_k breaks ties toward the lower index: a stable descending sort, without sorting all
  # n_blocks (at 128k: 2048 blocks per query and head).
  order = jax.lax.top_k(key, topk)[1].astype(jnp.int32)
  count = jnp.minimum(jnp.sum(key > -jnp.inf, axis=-1), topk)[..., None]
  valid = jnp.arange(topk) < count
  sentinel = np.int32(np.iinfo(np.int32).max)
  block_idx = jnp.sort(jnp.where(valid, order, sentinel), axis=-1)
  return jnp.where(valid, block_idx, -1).astype(jnp.int32), valid


# ----------------------------------------------------------------------------------------------
# Sparse attention


def _check_blocks(fn, block_idx, block_valid, batch=None, q_len=None, kv_heads=None):
  if block_idx.ndim != 4:
    raise ValueError(f"{fn}: block_idx must be 4-D [batch, q_len, kv_heads, topk], got shape {block_idx.shape}")
  if tuple(block_valid.shape) != tuple(block_idx.shape):
    raise ValueError(
        f"{fn}: block_valid must have the shape of block_idx {tuple(block_idx.shape)}, got "
        f"{tuple(block_valid.shape)}")
  if block_valid.dtype != jnp.bool_:
    raise ValueError(f"{fn}: block_valid must be bool, got {block_valid.dtype}")
  if not jnp.issubdtype(block_idx.dtype, jnp.integer):
    raise ValueError(f"{fn}: block_idx must be an integer array, got {block_idx.dtype}")
  expected = (batch, q_len, kv_heads)
  if batch is not None and tuple(block_idx.shape[:3]) != expected:
    raise ValueError(
        f"{fn}: block_idx must have shape [batch, q_len, kv_heads, topk] = {expected + ('topk',)}, "
        f"got {tuple(block_idx.shape)}")


def visible_mask(block_idx: jax.Array, block_valid: jax.Array, cfg: InfLLMv2Config, *,
                 kv_len: int) -> jax.Array:
  """bool [b, t_q, kv_heads, kv_len]: key j lies in one of the valid selected blocks (j // B)."""
  fn = "visible_mask"
  _check_cfg(fn, cfg)
  _check_blocks(fn, block_idx, block_valid)
  if not isinstance(kv_len, (int, np.integer)) or kv_len < 1:
    raise ValueError(f"{fn}: kv_len must be a positive int, got {kv_len!r}")
  n_blocks = -(-kv_len // cfg.block_size)
  hit = (block_idx[..., None] == jnp.arange(n_blocks, dtype=block_idx.dtype)) & block_valid[..., None]
  selected = jnp.any(hit, axis=-2)  # [b, t, kvh, n_blocks]
  return jnp.repeat(selected, cfg.block_size, axis=-1)[..., :kv_len]


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    block_valid: jax.Array,
    cfg: InfLLMv2Config,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_start: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    key_bias: jax.Array | None = None,
    return_lse: bool = False,
):
  """Attention restricted to the selected blocks; [b, t, heads, d] in q.dtype (and lse).

  Each query head attends to the keys of its KV head's valid selected blocks that the dense mask
  (`attention_mask`: causal, kv_lengths, segments) also allows. A query that sees no key gets
  zeros, and lse -inf. lse [b, t, heads] float32 is the natural-log logsumexp of the scaled logits
  q.k / sqrt(d) over the visible keys. key_bias (NOSA's eviction scores, `sparsejax.ops.nosa`):
  None or float [b, kv_len, kv_heads], added to the scaled logits of every query head of the KV
  head (so the attention weight of key s is proportional to exp(q.k_s / sqrt(d) + bias_s)).
  """
  fn = "sparse_attention"
  _check_cfg(fn, cfg)
  _check_attention_inputs(fn, q, k, v, segment_ids, kv_segment_ids, q_start, kv_lengths)
  b, t, h, d = q.shape
  kv_len, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  _check_blocks(fn, block_idx, block_valid, b, t, kvh)
  check_key_bias(fn, key_bias, k)

  mask = attention_mask(t, kv_len, batch=b, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                        q_start=q_start, kv_lengths=kv_lengths)
  mask = mask[:, :, None, :] & visible_mask(block_idx, block_valid, cfg, kv_len=kv_len)
  mask = jnp.transpose(mask, (0, 2, 1, 3))[:, :, None]  # [b, kvh, 1, t, s]

  qg = q.astype(jnp.float32).reshape(b, t, kvh, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / np.float32(math.sqrt(d))
  if key_bias is not None:
    logits = logits + jnp.transpose(key_bias.astype(jnp.float32), (0, 2, 1))[:, :, None, None, :]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  safe = jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", weights / safe, v.astype(jnp.float32))
  out = out.reshape(b, t, h, d).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(denom > 0, jnp.log(safe) + row_max, -jnp.inf)[..., 0]  # [b, kvh, g, t]
  return out, jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, h)


def check_key_bias(fn, key_bias, k, length_name: str = "kv_len"):
  """key_bias is None or a float [batch, kv_len, kv_heads] matching k [b, kv_len, kv_heads, d]
  (the ops and kernels that take NOSA's eviction scores share this check; `length_name` is what
  the caller calls k's second axis)."""
  if key_bias is None:
    return
  want = tuple(k.shape[:3])
  if (getattr(key_bias, "ndim", None) != 3 or tuple(key_bias.shape) != want
      or not jnp.issubdtype(key_bias.dtype, jnp.floating)):
    raise ValueError(f"{fn}: key_bias must be a float array [batch, {length_name}, kv_heads] = "
                     f"{want}, got {getattr(key_bias, 'dtype', type(key_bias))}"
                     f"{tuple(getattr(key_bias, 'shape', ()))}")


def infllmv2_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cfg: InfLLMv2Config,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_start: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
  """The full method: dense when kv_len < dense_len, else score -> select -> sparse attention.

  kv_len is k.shape[1] (static); when kv_lengths is given, rows whose filled length is below
  dense_len take the dense result too (the reference switches on the actual length).
  """
  fn = "infllmv2_attention"
  _check_cfg(fn, cfg)
  _check_attention_inputs(fn, q, k, v, segment_ids, kv_segment_ids, q_start, kv_lengths)
  kw = dict(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_start=q_start,
            kv_lengths=kv_lengths)
  kv_len = k.shape[1]
  if kv_len < cfg.dense_len:
    return dense_attention(q, k, v, implementation="xla", **kw)
  scores = block_scores(q, k, cfg, **kw)
  block_idx, block_valid = select_blocks(scores, cfg, q_len=q.shape[1], kv_len=kv_len,
                                         q_start=q_start, segment_ids=segment_ids,
                                         kv_segment_ids=kv_segment_ids)
  out = sparse_attention(q, k, v, block_idx, block_valid, cfg, **kw)
  if kv_lengths is not None:
    lengths = jnp.broadcast_to(jnp.asarray(kv_lengths).reshape(-1), (q.shape[0],))
    dense = dense_attention(q, k, v, implementation="xla", **kw)
    out = jnp.where((lengths < cfg.dense_len)[:, None, None, None], dense, out)
  return out


# ----------------------------------------------------------------------------------------------
# Decoding with compressed keys kept in the KV cache
#
# A decode step (one query token per row, at position q_start[b], keys [0, q_start[b]] filled)
# must not recompress the whole cache: the compressed keys live in the cache and a write of t
# tokens recomputes only the windows whose LAST token it wrote (`update_compressed_keys`), as
# the MiniCPM4 model file does with its per-layer buffer of not-yet-compressed keys (a window is
# emitted when its last token arrives). Scoring then reads the cached keys
# (`compressed_block_scores`), `select_decode_blocks` folds the per-row dense fallback into the
# block list, and `infllmv2_decode` is the whole step: equal to `infllmv2_attention` with q_len 1,
# q_start and kv_lengths = q_start + 1 on the same cache.


def update_compressed_keys(kc: jax.Array, k: jax.Array, offsets: jax.Array, count: int, *,
                           window: int, stride: int) -> jax.Array:
  """Recomputes the compressed keys that a write of `count` tokens at per-row `offsets` completed.

  kc [b, c, kv_heads, d] with c = num_windows(capacity, window, stride); k [b, capacity, kv_heads,
  d] the key cache AFTER the write (tokens [offsets[b], offsets[b] + count) of row b are new);
  offsets [b] int. Window i (tokens [i*stride, i*stride + window)) is recomputed, exactly as
  `compress_keys` computes it, iff its last token i*stride + window - 1 lies in [offsets[b],
  offsets[b] + count): at most ceil(count / stride) windows per row, so a decode step costs
  O(window), not O(capacity). Every other window keeps its value.

  Why that suffices, also for right-padded prompts whose padding the continuation overwrites: a
  window is visible to a query only once the query's position reaches the window's last token
  (module docstring). Tokens are written in position order, so the write that puts the window's
  last token in place comes after (or with) every other token of the window, and recomputes it
  from final tokens. A window computed earlier over padding (prefill of a right-padded row, whose
  length is then reset to the real prompt length) has its last token at or after the reset
  length: it is invisible until the write of that last token recomputes it.
  """
  fn = "update_compressed_keys"
  if k.ndim != 4:
    raise ValueError(f"{fn}: k must be [batch, capacity, kv_heads, head_dim], got shape {k.shape}")
  for name, value in (("window", window), ("stride", stride), ("count", count)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
  b, capacity = k.shape[:2]
  c = num_windows(capacity, window, stride)
  if kc.shape != (b, c) + k.shape[2:]:
    raise ValueError(f"{fn}: kc must have shape {(b, c) + k.shape[2:]} (num_windows of capacity "
                     f"{capacity} at window {window}, stride {stride}), got {kc.shape}")
  if count > capacity:
    raise ValueError(f"{fn}: count={count} exceeds the capacity {capacity}")
  if jnp.shape(offsets) != (b,) or not jnp.issubdtype(jnp.result_type(offsets), jnp.integer):
    raise ValueError(f"{fn}: offsets must be an int [batch={b}] array, got {jnp.shape(offsets)}")
  n = -(-count // stride)  # last tokens of windows are stride apart: <= ceil(count/stride) of them

  def one(kc_row, k_row, off):
    first = jnp.maximum(0, -((window - 1 - off) // stride))  # ceil((off - window + 1) / stride)
    i = first + jnp.arange(n, dtype=jnp.int32)
    last = i * stride + window - 1
    live = (last >= off) & (last < off + count) & (i < c)
    # Dead windows may reach past the cache: clip their tokens (their result is dropped).
    tokens = jnp.minimum(i[:, None] * stride + jnp.arange(window), capacity - 1).reshape(-1)
    # The windows laid end to end and pooled with stride = window: compress_keys' own mean.
    fresh = compress_keys(k_row[tokens][None], window=window, stride=window)[0]
    return kc_row.at[jnp.where(live, i, c)].set(fresh.astype(kc_row.dtype), mode="drop")

  return jax.vmap(one)(kc, k, jnp.asarray(offsets, jnp.int32))


def decode_width(cfg: InfLLMv2Config, kv_len: int) -> int:
  """Slots per row of `select_decode_blocks`: topk, or more when a row below dense_len needs more
  blocks to cover its whole filled cache (ceil((dense_len - 1) / block_size), at most all)."""
  n_blocks = -(-kv_len // cfg.block_size)
  dense_blocks = 0
  if cfg.dense_len > 1:
    dense_blocks = min(n_blocks, -(-(cfg.dense_len - 1) // cfg.block_size))
  return max(cfg.topk, dense_blocks)


def decode_selection_keys(q: jax.Array, kc: jax.Array, cfg: InfLLMv2Config, *, kv_len: int,
                          q_start: jax.Array, kc_coarse: jax.Array | None = None,
                          segment_ids: jax.Array | None = None,
                          kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """`selection_keys` of `compressed_block_scores` for one query token per row at q_start [b]
  (keys [0, q_start] filled): float32 [b, 1, kv_heads, ceil(kv_len / block_size)]."""
  scores = compressed_block_scores(q, kc, cfg, kv_len=kv_len, kc_coarse=kc_coarse,
                                   segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                   q_start=q_start, kv_lengths=q_start + 1)
  return selection_keys(scores, cfg, q_len=1, kv_len=kv_len, q_start=q_start,
                        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


def select_decode_blocks(
    q: jax.Array,
    kc: jax.Array,
    cfg: InfLLMv2Config,
    *,
    kv_len: int,
    q_start: jax.Array,
    kc_coarse: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    top_blocks_fn=None,
    selection_keys_fn=None,
) -> tuple[jax.Array, jax.Array]:
  """The key blocks each decode query attends: (block_idx int32, block_valid bool), both
  [b, 1, kv_heads, decode_width(cfg, kv_len)] (top_blocks_fn: as in `select_blocks`;
  selection_keys_fn(q, kc, cfg, kv_len=, q_start=, kc_coarse=, segment_ids=, kv_segment_ids=)
  may stand in for `selection_keys` of `compressed_block_scores`: pallas_kernels/block_scores'
  decode kernels, whose keys may carry extra -inf columns).

  q [b, 1, heads, d] at position q_start [b] of a cache of kv_len slots whose keys [0, q_start]
  are filled; kc / kc_coarse the cached compressed keys (`compressed_block_scores`). A row with
  q_start + 1 >= dense_len gets `select_blocks` of the compressed scores (its topk slots, then
  invalid ones); a shorter row, which `infllmv2_attention` serves with dense attention, gets every
  block up to its own (the same keys once the causal mask applies). Valid slots come first,
  ascending; invalid ones hold -1.
  """
  fn = "select_decode_blocks"
  _check_cfg(fn, cfg)
  if q.ndim != 4 or q.shape[1] != 1:
    raise ValueError(f"{fn}: q must be [batch, 1, num_heads, head_dim] (one token), got {q.shape}")
  if q_start is None:
    raise ValueError(f"{fn}: q_start (the query positions, [batch]) is required")
  b = q.shape[0]
  q_start = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32).reshape(-1), (b,))
  key = (selection_keys_fn or decode_selection_keys)(
      q, kc, cfg, kv_len=kv_len, q_start=q_start, kc_coarse=kc_coarse, segment_ids=segment_ids,
      kv_segment_ids=kv_segment_ids)
  idx, valid = (top_blocks_fn or top_blocks)(key, cfg.topk)
  width = decode_width(cfg, kv_len)
  pad = ((0, 0), (0, 0), (0, 0), (0, width - cfg.topk))
  idx = jnp.pad(idx, pad, constant_values=-1)
  valid = jnp.pad(valid, pad, constant_values=False)
  slots = jnp.arange(width, dtype=jnp.int32)
  dense_count = -(-(q_start + 1) // cfg.block_size)  # blocks holding keys [0, q_start]
  dense_valid = slots[None, :] < dense_count[:, None]  # [b, width]
  dense_idx = jnp.where(dense_valid, slots[None, :], -1)
  is_dense = (q_start + 1 < cfg.dense_len)[:, None, None, None]
  idx = jnp.where(is_dense, dense_idx[:, None, None, :], idx)
  valid = jnp.where(is_dense, dense_valid[:, None, None, :], valid)
  return idx.astype(jnp.int32), valid


def infllmv2_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kc: jax.Array,
    cfg: InfLLMv2Config,
    *,
    q_start: jax.Array,
    kc_coarse: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
  """One decode step from the cached compressed keys: [b, 1, heads, d] in q.dtype.

  q [b, 1, heads, d] at positions q_start [b]; k, v [b, kv_len, kv_heads, d] the cache with
  keys [0, q_start] filled (this step's token included); kc (and kc_coarse with
  cfg.approximate_lse) the cached compressed keys, e.g. kept by `update_compressed_keys`;
  segment_ids [b, 1] / kv_segment_ids [b, kv_len] as in `infllmv2_attention`. Equals
  `infllmv2_attention(q, k, v, cfg, q_start=q_start, kv_lengths=q_start + 1, ...)` whenever kc
  agrees with `compress_keys(k)` on the windows visible to the queries.
  """
  fn = "infllmv2_decode"
  _check_cfg(fn, cfg)
  _check_attention_inputs(fn, q, k, v, segment_ids, kv_segment_ids, q_start, None)
  if q.shape[1] != 1:
    raise ValueError(
        f"{fn}: q must hold one token per row ([batch, 1, heads, head_dim]), got {q.shape}")
  if q_start is None:
    raise ValueError(f"{fn}: q_start (the query positions, [batch]) is required")
  b, kv_len = q.shape[0], k.shape[1]
  q_start = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32).reshape(-1), (b,))
  kw = dict(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_start=q_start,
            kv_lengths=q_start + 1)
  if kv_len < cfg.dense_len:
    return dense_attention(q, k, v, implementation="xla", **kw)
  block_idx, block_valid = select_decode_blocks(q, kc, cfg, kv_len=kv_len, q_start=q_start,
                                                kc_coarse=kc_coarse, segment_ids=segment_ids,
                                                kv_segment_ids=kv_segment_ids)
  return sparse_attention(q, k, v, block_idx, block_valid, cfg, **kw)
