"""The jnp reference of the block-sparse attention kernels (materialises the scores)."""
import math

import jax
import jax.numpy as jnp


def sparse_attention_reference(q, k, v, block_idx, block_valid, segment_ids, *, block_size: int,
                               key_bias=None):
  """Same contract as `op.sparse_attention`; returns (out, lse [b, t, heads]). key_bias: None or
  [b, seq, kv_heads], added to the scaled logits of every query head of its KV head."""
  batch, seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  n_blocks = -(-seq // block_size)
  live = block_valid & (block_idx >= 0)
  chosen = jnp.any((block_idx[..., None] == jnp.arange(n_blocks)) & live[..., None], axis=-2)
  visible = jnp.repeat(chosen, block_size, axis=-1)[..., :seq]       # [b, t, kvh, s]
  pos = jnp.arange(seq)
  visible &= (pos[None, :, None, None] >= pos[None, None, None, :])
  visible &= (segment_ids[:, :, None, None] == segment_ids[:, None, None, :])
  qg = q.astype(jnp.float32).reshape(batch, seq, kv_heads, group, head_dim)
  logits = jnp.einsum("btkgd,bskd->btkgs", qg, k.astype(jnp.float32)) / math.sqrt(head_dim)
  if key_bias is not None:
    logits = logits + jnp.transpose(key_bias.astype(jnp.float32), (0, 2, 1))[:, None, :, None]
  logits = jnp.where(visible[:, :, :, None], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)                            # [b, t, kvh, g]
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum("btkgs,bskd->btkgd", probs, v.astype(jnp.float32))
  return out.reshape(q.shape).astype(q.dtype), lse.reshape(batch, seq, heads)
