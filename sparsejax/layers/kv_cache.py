"""The KV cache as plain pytrees, so prefill and decode stay pure jitted functions.

Tokens are written at per-row offsets: rows of a batch may hold prompts of different lengths.
Keys are cached after RoPE, so a cached entry keeps the position it was computed at.

InfLLM-V2 layers also keep their compressed keys here (`LayerKV.kc`, and `kc_coarse` with the LSE
approximation): the mean of the cached keys over every window of compress_window tokens,
compress_stride apart (`sparsejax.ops.infllmv2.compress_keys` of `k`), updated by the layer on
each write for the windows that write completed (`update_compressed_keys`), so that a decode step
scores blocks without recompressing the whole cache. NOSA layers keep them too, and their
eviction head's per-token scores (`LayerKV.evict`, written with each token's value: the score
depends on nothing else). Dense and sliding-window layers hold None.
"""
import numbers

import flax.struct
import jax
import jax.numpy as jnp

from sparsejax.ops.infllmv2 import num_windows


@flax.struct.dataclass
class LayerKV:
  k: jax.Array  # [batch, capacity, num_kv_heads, head_dim]
  v: jax.Array  # [batch, capacity, num_kv_heads, head_dim]
  # [batch, num_windows(capacity, window, stride), num_kv_heads, head_dim] or None: window i is
  # the mean of k[:, i*stride : i*stride + window] once its last token is written.
  kc: jax.Array | None = None
  kc_coarse: jax.Array | None = None  # the same at (lse_window, lse_stride), or None
  evict: jax.Array | None = None  # float32 [batch, capacity, num_kv_heads]: NOSA's scores, or None


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
           head_dim: int, dtype=jnp.bfloat16,
           compressed: tuple[tuple[int, int], ...] = (), eviction: bool = False) -> "KVCache":
    """An empty cache. `compressed`: () for plain k/v; ((window, stride),) adds `kc` to every
    layer, ((window, stride), (lse_window, lse_stride)) also `kc_coarse` (zeros until written).
    `eviction` adds `evict` (NOSA's per-token eviction scores, float32)."""
    if len(compressed) > 2 or any(
        len(pair) != 2 or any(not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 1
                              for x in pair) for pair in compressed):
      raise ValueError(f"KVCache.init: compressed must hold at most two (window, stride) pairs of "
                       f"positive ints, got {compressed!r}")
    shape = (batch, capacity, num_kv_heads, head_dim)
    extra = [jnp.zeros((batch, num_windows(capacity, w, s), num_kv_heads, head_dim), dtype)
             for w, s in compressed]
    extra += [None] * (2 - len(extra))
    evict = jnp.zeros((batch, capacity, num_kv_heads), jnp.float32) if eviction else None
    layers = tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), *extra, evict)
                   for _ in range(num_layers))
    return cls(layers, jnp.zeros((batch, capacity), jnp.int32), jnp.zeros((batch,), jnp.int32))

  @classmethod
  def for_model(cls, config, *, batch: int, capacity: int, dtype=None) -> "KVCache":
    """The cache a model of `config` (a ModelConfig) decodes with: compressed keys for
    attention="infllmv2" and "nosa" (the coarse ones too with approximate_lse), and NOSA's
    eviction scores; plain k/v otherwise. dtype defaults to the model's compute dtype."""
    compressed = ()
    if config.attention in ("infllmv2", "nosa"):
      from sparsejax.layers.infllmv2 import block_sparse_config  # the layer imports this module
      sparse = block_sparse_config(config)
      compressed = ((sparse.compress_window, sparse.compress_stride),)
      if sparse.approximate_lse:
        compressed += ((sparse.lse_window, sparse.lse_stride),)
    return cls.init(num_layers=config.num_layers, batch=batch, capacity=capacity,
                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                    dtype=config.compute_dtype if dtype is None else dtype, compressed=compressed,
                    eviction=config.attention == "nosa")


def write_rows(buffer: jax.Array, update: jax.Array, offsets: jax.Array) -> jax.Array:
  """buffer[b, offsets[b]:offsets[b] + update.shape[1]] = update[b], for every row b.

  The caller guarantees offsets + update length <= capacity (lax.dynamic_update_slice would
  otherwise clamp the offset and overwrite the wrong slots); `generate` checks it up front.
  """
  def one(buf, upd, off):
    start = (off,) + (0,) * (buf.ndim - 1)
    return jax.lax.dynamic_update_slice(buf, upd.astype(buf.dtype), start)
  return jax.vmap(one)(buffer, update, offsets)
