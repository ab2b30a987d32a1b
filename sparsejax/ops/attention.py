"""Dense grouped-query attention: the reference semantics and the cuDNN fast path.

Conventions shared by every attention in sparsejax:
  q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim];
  num_heads is a multiple of num_kv_heads (the query heads of group g share KV head g).
  Query t sits at index `q_start + t` of the key sequence (q_start = 0 for self-attention over
  a whole row; the number of tokens already in the KV cache during decoding). Key j is visible to
  query t when j <= q_start + t (causal), j < kv_lengths (the cache's filled part) and both carry
  the same segment id (packed rows: no attention across documents). Segment id 0 marks padding;
  padding tokens attend only to padding, so no row is ever fully masked. With `window=W` (sliding
  window attention) key j is also required to satisfy (q_start + t) - j < W: the query and the
  W - 1 keys before it.
"""
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Implementation = Literal["xla", "cudnn"] | None


def _check_shapes(q, k, v, segment_ids, kv_segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        "dense_attention: q, k, v must be 4-D [batch, seq, heads, head_dim]; got "
        f"q{q.shape}, k{k.shape}, v{v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"dense_attention: k and v must have the same shape, got {k.shape} and {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
    raise ValueError(
        f"dense_attention: q{q.shape} and k{k.shape} must agree on batch and head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
        f"dense_attention: num_heads={q.shape[2]} (q.shape[2]) must be a multiple of "
        f"num_kv_heads={k.shape[2]} (k.shape[2])")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(
        f"dense_attention: segment_ids must have shape {q.shape[:2]}, got {segment_ids.shape}")
  if kv_segment_ids is not None and kv_segment_ids.shape != k.shape[:2]:
    raise ValueError(
        f"dense_attention: kv_segment_ids must have shape {k.shape[:2]}, got {kv_segment_ids.shape}")


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    batch: int,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_start: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
) -> jax.Array:
  """The boolean visibility mask [batch, q_len, kv_len] defined in the module docstring."""
  q_idx = jnp.arange(q_len)[None, :, None]
  kv_idx = jnp.arange(kv_len)[None, None, :]
  if q_start is not None:
    q_idx = q_idx + jnp.asarray(q_start).reshape(-1, 1, 1)
  mask = jnp.ones((batch, q_len, kv_len), dtype=bool)
  if causal:
    mask &= kv_idx <= q_idx
  if window is not None:
    mask &= q_idx - kv_idx < window
  if kv_lengths is not None:
    mask &= kv_idx < jnp.asarray(kv_lengths).reshape(-1, 1, 1)
  if segment_ids is not None:
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    mask &= segment_ids[:, :, None] == kv_seg[:, None, :]
  return mask


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_start: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    implementation: Implementation = None,
    max_segments: int = 64,
) -> jax.Array:
  """Grouped-query softmax attention; returns [batch, q_len, num_heads, head_dim] in q.dtype.

  Args:
    q, k, v, segment_ids, kv_segment_ids, q_start, kv_lengths, causal: see the module docstring.
      `kv_segment_ids` defaults to `segment_ids` (self-attention); `q_start` and `kv_lengths`
      are [batch] int arrays.
    window: sliding-window size in tokens (None: unlimited), see the module docstring.
    implementation: "xla" (the reference, materialises the scores), "cudnn" (flash attention;
      GPU only, self-attention over whole rows, bf16 / fp16 with head_dim a multiple of 8 up
      to 128), or None (cudnn when running on a GPU and the call is one cuDNN takes, else xla).
    max_segments: static bound on the runs of equal segment ids per row (documents plus the
      padding run) that the cuDNN path is compiled for. A row with more comes out NaN rather
      than silently wrong; the trainer checks batches against the bound before the step.
  """
  _check_shapes(q, k, v, segment_ids, kv_segment_ids)
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"dense_attention: window must be a positive int or None, got {window!r}")
  self_attention = (q_start is None and kv_lengths is None and kv_segment_ids is None
                    and q.shape[1] == k.shape[1] and causal)
  if implementation is None:
    # cuDNN's training kernels need an even sequence length when a padding mask is used.
    cudnn_ok = (self_attention and cudnn_takes(q, k, v)
                and (segment_ids is None or q.shape[1] % 2 == 0))
    implementation = "cudnn" if (jax.default_backend() == "gpu" and cudnn_ok) else "xla"
  if implementation == "xla":
    return _xla_attention(q, k, v, segment_ids, kv_segment_ids, q_start, kv_lengths, causal,
                          window)
  if implementation == "cudnn":
    if not self_attention:
      raise ValueError(
          "dense_attention(implementation='cudnn') supports causal self-attention over whole "
          "rows only (no q_start, kv_lengths or kv_segment_ids); use implementation='xla'")
    return _cudnn_attention(q, k, v, segment_ids, max_segments, window)
  raise ValueError(f"dense_attention: implementation must be 'xla', 'cudnn' or None, got {implementation!r}")


def cudnn_takes(q, k, v) -> bool:
  """Whether cuDNN's flash attention accepts these operands: jax's entry point raises for float32
  (so a float32 model on a GPU takes the xla path) and for head dims it has no kernel for."""
  head_dim = q.shape[-1]
  return (q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def _xla_attention(q, k, v, segment_ids, kv_segment_ids, q_start, kv_lengths, causal,
                   window=None):
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  mask = attention_mask(q_len, kv_len, batch=batch, segment_ids=segment_ids,
                        kv_segment_ids=kv_segment_ids, q_start=q_start, kv_lengths=kv_lengths,
                        causal=causal, window=window)
  qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(head_dim).astype(np.float32)
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  # A query with no visible key (only possible for cache slots past kv_lengths) gets zeros.
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(scores - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def segment_runs(segment_ids: jax.Array, max_segments: int):
  """Lengths and start offsets of the contiguous runs of equal ids in each row.

  Returns (seqlens [batch, max_segments], offsets [batch, max_segments + 1], num_runs [batch]):
  run lengths and start indices, padded with -1 past the last run (the packed, "ragged" layout
  of jax's cuDNN attention, which holds starts only: no end offset).
  """
  batch, seq = segment_ids.shape
  starts = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  run = jnp.cumsum(starts, axis=1) - 1  # run index of every token
  num_runs = run[:, -1] + 1
  slots = jnp.arange(max_segments)
  seqlens = jnp.sum(run[:, :, None] == slots[None, None, :], axis=1).astype(jnp.int32)
  starts = jnp.cumsum(seqlens, axis=1, dtype=jnp.int32) - seqlens
  live = slots[None, :] < num_runs[:, None]
  seqlens = jnp.where(live, seqlens, -1)
  # cuDNN's layout: the start of each run, -1 past the last one, one spare -1 column.
  offsets = jnp.concatenate([jnp.where(live, starts, -1), jnp.full((batch, 1), -1, jnp.int32)],
                            axis=1)
  return seqlens, offsets, num_runs


def _shard_alike(q, k, v):
  """cuDNN's partitioner insists that q, k and v be sharded alike, while the projections leave
  q's heads split over `tensor` and the (fewer) KV heads replicated. Under a mesh (jax.set_mesh,
  as the trainer runs its steps) all three get rows split over the batch axes and heads split
  over `tensor` where the KV heads divide, replicated otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return q, k, v
  batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
  tensor = mesh.shape.get("tensor", 1)
  splits = math.prod(mesh.shape[a] for a in batch_axes)
  rows = batch_axes if batch_axes and q.shape[0] % splits == 0 else None
  heads = "tensor" if tensor > 1 and k.shape[2] % tensor == 0 else None
  spec = jax.sharding.PartitionSpec(rows, None, heads, None)
  return tuple(jax.lax.with_sharding_constraint(x, spec) for x in (q, k, v))


def _cudnn_attention(q, k, v, segment_ids, max_segments, window=None):
  # The cuDNN entry point that takes packed offsets is not re-exported by jax.nn; jax is pinned.
  from jax._src.cudnn.fused_attention_stablehlo import MaskType
  from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dpa

  q, k, v = _shard_alike(q, k, v)
  scale = float(1.0 / np.sqrt(q.shape[-1]))
  # cuDNN's sliding window covers (pos - window, pos]: the same keys as `window` here.
  if segment_ids is None:
    return cudnn_dpa(q, k, v, scale=scale, mask_type=MaskType.CAUSAL,
                     sliding_window_length=window)
  seqlens, offsets, num_runs = segment_runs(segment_ids, max_segments)

  out = cudnn_dpa(q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets,
                  kv_offsets=offsets, scale=scale, mask_type=MaskType.PADDING_CAUSAL,
                  sliding_window_length=window)
  # A row with more runs than the compiled bound would be attended wrongly: make it NaN, loudly.
  fits = (num_runs <= max_segments)[:, None, None, None]
  return jnp.where(fits, out, jnp.nan).astype(q.dtype)
