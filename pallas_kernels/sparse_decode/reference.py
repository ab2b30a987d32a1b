"""The jnp reference of the block-sparse decode kernel: gathers the selected blocks and takes a
float32 softmax over their visible keys (O(selected keys), not O(cache))."""
import math

import jax.numpy as jnp


def sparse_decode_reference(q, k, v, block_idx, block_valid, lengths, q_segment_ids=None,
                            kv_segment_ids=None, key_bias=None, *, block_size: int):
  """Same contract as `op.sparse_decode`; returns (out [b, heads, d] in q.dtype, lse [b, heads])."""
  batch, heads, d = q.shape
  capacity, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  pos = block_idx[..., None] * block_size + jnp.arange(block_size)  # [b, kvh, W, B]
  live = block_idx >= 0 if block_valid is None else block_valid & (block_idx >= 0)
  visible = live[..., None] & (pos < lengths[:, None, None, None])
  visible &= pos < capacity
  pos = jnp.clip(pos, 0, capacity - 1).reshape(batch, kv_heads, -1)  # [b, kvh, W*B]
  visible = visible.reshape(pos.shape)
  if q_segment_ids is not None:
    kv_seg = jnp.take_along_axis(kv_segment_ids[:, None, :], pos, axis=2)
    visible &= kv_seg == q_segment_ids[:, None, None]
  gather = lambda x: jnp.take_along_axis(jnp.swapaxes(x, 1, 2), pos[..., None], axis=2)
  keys, values = gather(k).astype(jnp.float32), gather(v).astype(jnp.float32)  # [b, kvh, n, d]
  qg = q.astype(jnp.float32).reshape(batch, kv_heads, group, d)
  logits = jnp.einsum("bkgd,bknd->bkgn", qg, keys) / math.sqrt(d)
  if key_bias is not None:  # [b, capacity, kvh] -> the gathered keys' [b, kvh, 1, n]
    bias = jnp.take_along_axis(jnp.swapaxes(key_bias.astype(jnp.float32), 1, 2), pos, axis=2)
    logits = logits + bias[:, :, None]
  logits = jnp.where(visible[:, :, None], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  safe = jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bkgn,bknd->bkgd", weights / safe, values).reshape(batch, heads, d)
  lse = jnp.where(total > 0, jnp.log(safe) + row_max, -jnp.inf).reshape(batch, heads)
  return out.astype(q.dtype), lse
