"""The KV cache as plain pytrees, so prefill and decode stay pure jitted functions.

Tokens are written at per-row offsets: rows of a batch may hold prompts of different lengths.
Keys are cached after RoPE, so a cached entry keeps the position it was computed at.
"""
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LayerKV:
  k: jax.Array  # [batch, capacity, num_kv_heads, head_dim]
  v: jax.Array  # [batch, capacity, num_kv_heads, head_dim]


@flax.struct.dataclass
class KVCache:
  layers: tuple[LayerKV, ...]
  segment_ids: jax.Array  # [batch, capacity]; 0 for unwritten slots
  lengths: jax.Array      # [batch] int32: slots filled so far (the next write offset)

  @property
  def capacity(self) -> int:
    return self.segment_ids.shape[1]

  @classmethod
  def init(cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int,
           head_dim: int, dtype=jnp.bfloat16) -> "KVCache":
    shape = (batch, capacity, num_kv_heads, head_dim)
    layers = tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                   for _ in range(num_layers))
    return cls(layers, jnp.zeros((batch, capacity), jnp.int32), jnp.zeros((batch,), jnp.int32))


def write_rows(buffer: jax.Array, update: jax.Array, offsets: jax.Array) -> jax.Array:
  """buffer[b, offsets[b]:offsets[b] + update.shape[1]] = update[b], for every row b.

  The caller guarantees offsets + update length <= capacity (lax.dynamic_update_slice would
  otherwise clamp the offset and overwrite the wrong slots); `generate` checks it up front.
  """
  def one(buf, upd, off):
    start = (off,) + (0,) * (buf.ndim - 1)
    return jax.lax.dynamic_update_slice(buf, upd.astype(buf.dtype), start)
  return jax.vmap(one)(buffer, update, offsets)
