"""The public op: InfLLM-V2 block scores (and selection) for self-attention over whole rows.

  block_scores(q, k, cfg, segment_ids=None, implementation="pallas" | "interpret" | "reference",
               ranking_keys=False, merged=True)
      -> float32 [batch, seq, kv_heads, ceil(seq / block_size)] (scores, or ranking keys);
         merged=False: the kernel's (own, tail) maxima, which block_topk.merge_tail combines
  score_and_select(...) -> (block_idx, block_valid) [batch, seq, kv_heads, topk]

Same contract and result as `sparsejax.ops.infllmv2.block_scores` / `select_blocks` with
q_len == kv_len (the reference is the semantics); the kernel never materialises the per-head
probabilities over the compressed keys. Selection is discrete and has no gradient.
"""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_topk
from pallas_kernels.block_scores.kernel import block_scores_kernel
from pallas_kernels.sparse_attention.index import next_power_of_2
from sparsejax.ops import infllmv2 as reference

IMPLEMENTATIONS = ("pallas", "interpret", "reference")
_NEVER = np.iinfo(np.int32).max  # "last token" of a padding window: visible to no query


def _check(q, k, cfg, segment_ids, implementation, block_rows, block_windows):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"block_scores: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if not isinstance(cfg, reference.InfLLMv2Config):
    raise ValueError(f"block_scores: cfg must be an InfLLMv2Config, got {type(cfg).__name__}")
  if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"block_scores: self-attention needs q [b, t, heads, d] and k [b, t, kv_heads, "
                     f"d] over the same tokens; got q{q.shape} k{k.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"block_scores: num_heads={q.shape[2]} must be a multiple of "
                     f"num_kv_heads={k.shape[2]}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"block_scores: segment_ids must be {q.shape[:2]}, got {segment_ids.shape}")
  ratio = cfg.block_size // cfg.compress_stride
  if ratio & (ratio - 1):
    raise ValueError(f"block_scores: the kernel needs block_size / compress_stride a power of two, "
                     f"got {cfg.block_size} / {cfg.compress_stride}")
  for name, value in (("block_rows", block_rows), ("block_windows", block_windows)):
    if value < 16 or value & (value - 1):
      raise ValueError(f"block_scores: {name} must be a power of two >= 16, got {value}")
  if block_windows % ratio:
    raise ValueError(f"block_scores: block_windows={block_windows} must be a multiple of "
                     f"block_size / compress_stride = {ratio}")
  if cfg.compress_window > cfg.block_size:
    raise ValueError(f"block_scores: the kernel needs compress_window <= block_size (a window "
                     f"overlaps at most two blocks), got {cfg.compress_window} > {cfg.block_size}")


def _windows(k, seg, window, stride, padded):
  """Compressed keys [b, padded, kvh, d], last token [padded] (numpy), and with seg [b, t] the
  segment ids [b, padded] (-1 when the window straddles two segments or is padding), else None."""
  kc = reference.compress_keys(k, window=window, stride=stride)
  c = kc.shape[1]
  last = np.full((padded,), _NEVER, np.int32)
  last[:c] = np.arange(c) * stride + window - 1
  pad = padded - c
  kc = jnp.pad(kc, ((0, 0), (0, pad), (0, 0), (0, 0)))
  if seg is None:
    return kc, last, None
  idx = np.arange(c)[:, None] * stride + np.arange(window)[None, :]
  tokens = seg[:, idx]  # [b, c, window]
  wseg = jnp.where(jnp.all(tokens == tokens[:, :, :1], axis=-1), tokens[:, :, 0], -1)
  return kc, last, jnp.pad(wseg, ((0, 0), (0, pad)), constant_values=-1)


def block_scores(q, k, cfg: reference.InfLLMv2Config, *, segment_ids=None,
                 implementation: str = "pallas", ranking_keys: bool = False,
                 block_rows: int = 128, block_windows: int = 64, num_warps: int = 8,
                 num_stages: int = 2, merged: bool = True):
  """See the module docstring. ranking_keys: return `selection_keys` of the scores instead
  (+inf forced, -inf ineligible; one document per row, so no segment_ids), which the kernel
  writes in place of the scores. merged=False: return the kernel's (own, tail) maxima unmerged
  (tail None when windows do not overlap, or from the reference), for a reader that applies
  `block_topk.merge_tail` as it loads them (the top-k kernel does). block_rows: (token, head)
  rows per program (block_q = block_rows / group tokens); block_windows: compressed windows per tile. The defaults are the
  fastest of `experiments.bench_attention --tune` on the H100 (64k tokens, groups of 16 heads:
  7.7 ms, against 8.2 at 4 warps; experiments/results/bench_attention_tuned.*)."""
  _check(q, k, cfg, segment_ids, implementation, block_rows, block_windows)
  if ranking_keys and segment_ids is not None:
    raise ValueError("block_scores: ranking_keys=True takes no segment_ids (one document per "
                     "row); use select_blocks' keys for packed documents")
  if implementation == "reference":
    scores = reference.block_scores(q, k, cfg, segment_ids=segment_ids)
    if ranking_keys:
      scores = reference.selection_keys(scores, cfg, q_len=q.shape[1], kv_len=k.shape[1])
    return scores if merged else (scores, None)
  own, tail = _kernel_outputs(q, k, cfg, segment_ids=segment_ids, implementation=implementation,
                              ranking_keys=ranking_keys, block_rows=block_rows,
                              block_windows=block_windows, num_warps=num_warps,
                              num_stages=num_stages)
  if not merged:
    return own, tail
  return own if tail is None else block_topk.merge_tail(own, tail)


def _kernel_outputs(q, k, cfg, *, segment_ids, implementation, ranking_keys, block_rows,
                    block_windows, num_warps, num_stages):
  """The kernel's (own, tail) maxima (kernel.py), cut to [batch, seq, kv_heads, n_blocks]."""
  batch, seq, heads, d = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  group_pad = next_power_of_2(group)
  block_q = max(1, block_rows // group_pad)
  seq_pad = -(-seq // block_q) * block_q
  ratio = cfg.block_size // cfg.compress_stride
  overlap = cfg.compress_window // cfg.compress_stride
  n_blocks = -(-seq // cfg.block_size)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)

  c = reference.num_windows(seq, cfg.compress_window, cfg.compress_stride)
  tiles = max(1, -(-c // block_windows), -(-n_blocks * ratio // block_windows))
  kc, last, wseg = _windows(k, seg, cfg.compress_window, cfg.compress_stride,
                            tiles * block_windows)
  coarse = None
  if cfg.approximate_lse:
    c2 = reference.num_windows(seq, cfg.lse_window, cfg.lse_stride)
    kc2, last2, wseg2 = _windows(k, seg, cfg.lse_window, cfg.lse_stride,
                                 max(1, -(-c2 // block_windows)) * block_windows)
    coarse = (kc2, jnp.asarray(last2), wseg2)

  qg = q.reshape(batch, seq, kv_heads, group, d)
  qg = jnp.pad(qg, ((0, 0), (0, seq_pad - seq), (0, 0), (0, group_pad - group), (0, 0)))
  segments = None
  if seg is not None:
    segments = (jnp.pad(seg, ((0, 0), (0, seq_pad - seq)), constant_values=-2), wseg)
  own, tail = block_scores_kernel(
      qg.reshape(batch, seq_pad, kv_heads * group_pad, d), kc, jnp.asarray(last), coarse,
      segments, block_q=block_q, heads=group, block_windows=block_windows, ratio=ratio,
      overlap=overlap, window=cfg.compress_window, stride=cfg.compress_stride,
      lse_window=cfg.lse_window, lse_stride=cfg.lse_stride,
      ranking=(("block_size", cfg.block_size), ("init_blocks", cfg.init_blocks),
               ("local_blocks", cfg.local_blocks)) if ranking_keys else None,
      interpret=implementation == "interpret", num_warps=num_warps, num_stages=num_stages)
  cut = lambda x: None if x is None else x[:, :seq, :, :n_blocks]
  return cut(own), cut(tail)


def score_and_select(q, k, cfg: reference.InfLLMv2Config, *, segment_ids=None,
                     implementation: str = "pallas", topk_implementation: str = "reference",
                     **kernel_options):
  """`block_scores` then `select_blocks` (top-k with forced init/local blocks): (block_idx
  int32, block_valid bool), both [batch, seq, kv_heads, topk]. No gradient.
  topk_implementation: "reference" (XLA's top_k and sort) or the sort-free kernel of
  pallas_kernels/block_topk ("pallas" | "interpret"); the same result either way."""
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  if segment_ids is None:
    # One document per row: the scoring kernel writes the ranking keys itself (at 128k XLA's
    # passes over the 2 GiB of scores took ~3.4 ms; experiments/results/infllmv2_targets.md),
    # and the top-k merges in the tail maxima as it loads them.
    key, tail = block_scores(q, k, cfg, implementation=implementation, ranking_keys=True,
                             merged=False, **kernel_options)
    return block_topk.top_blocks(key, cfg.topk, implementation=topk_implementation, tail=tail)
  scores = block_scores(q, k, cfg, segment_ids=segment_ids, implementation=implementation,
                        **kernel_options)
  return block_topk.select_blocks(scores, cfg, q_len=q.shape[1], kv_len=k.shape[1],
                                  segment_ids=segment_ids, implementation=topk_implementation)
