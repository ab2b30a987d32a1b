"""The evicting KV cache: per KV head, a compacted list of entries with positions and scores.

One `EvictingLayerKV` per layer:
  k, v       [batch, kv_heads, capacity, head_dim]  keys *before* RoPE, values
  positions  [batch, kv_heads, capacity] int32      each entry's original token position
  scores     [batch, kv_heads, capacity] float32    each entry's importance (the scorer's)
  lengths    [batch, kv_heads] int32                live entries of each (row, head)
Slots [0, lengths[b, h]) of row b, head h are live and sorted by position; later slots are free
(stale contents, never visible). Every (row, head) keeps its own set of tokens and its own
count: per-head budgets are real, not faked by masking. Eviction compacts the kept entries to
the front, so attention and the next append work on dense slots.

Keys are stored before RoPE and rotated at attention time, with either their original positions
or positions re-assigned contiguously (slot index), so both position modes run from one cache.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.ops.rope import apply_rope

POSITION_MODES = ("original", "contiguous")


@flax.struct.dataclass
class EvictingLayerKV:
  k: jax.Array          # [batch, kv_heads, capacity, head_dim], pre-RoPE
  v: jax.Array          # [batch, kv_heads, capacity, head_dim]
  positions: jax.Array  # [batch, kv_heads, capacity] int32, original positions
  scores: jax.Array     # [batch, kv_heads, capacity] float32
  lengths: jax.Array    # [batch, kv_heads] int32, live entries

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  @classmethod
  def init(cls, *, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
           dtype=jnp.bfloat16) -> "EvictingLayerKV":
    shape = (batch, num_kv_heads, capacity)
    return cls(jnp.zeros(shape + (head_dim,), dtype), jnp.zeros(shape + (head_dim,), dtype),
               jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32),
               jnp.zeros((batch, num_kv_heads), jnp.int32))


def cache_bytes(caches) -> int:
  """Bytes of every array of a cache pytree (k, v, positions, scores, lengths, all layers)."""
  return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(caches)))


def append(layer: EvictingLayerKV, k: jax.Array, v: jax.Array, positions: jax.Array,
           n_valid: jax.Array) -> tuple[EvictingLayerKV, jax.Array]:
  """Writes a step's T tokens after each (row, head)'s live entries.

  Args:
    layer: the cache; the caller guarantees lengths + T <= capacity (see `attend`).
    k, v: [batch, T, kv_heads, head_dim] pre-RoPE keys and values of the step.
    positions: [batch, T] their original positions.
    n_valid: [batch] tokens of the step that are real (the rest is right padding).
  Returns:
    (the cache with lengths advanced by n_valid and scores 0 in the new slots,
     the lengths before the write [batch, kv_heads]).
  """
  old = layer.lengths
  num_kv = layer.k.shape[1]

  def write(buf, upd):  # buf [b, K, S, ...], upd [b, K, T, ...], at old[b, K]
    def one(b, u, off):
      return jax.lax.dynamic_update_slice(b, u.astype(b.dtype), (off,) + (0,) * (b.ndim - 1))
    return jax.vmap(jax.vmap(one))(buf, upd, old)

  pos = jnp.broadcast_to(positions[:, None, :], (positions.shape[0], num_kv, positions.shape[1]))
  new = layer.replace(
      k=write(layer.k, k.transpose(0, 2, 1, 3)), v=write(layer.v, v.transpose(0, 2, 1, 3)),
      positions=write(layer.positions, pos.astype(jnp.int32)),
      scores=write(layer.scores, jnp.zeros(pos.shape, jnp.float32)),
      lengths=old + n_valid[:, None].astype(jnp.int32))
  return new, old


def rope_positions(layer: EvictingLayerKV, old_lengths: jax.Array, q_positions: jax.Array,
                   mode: str) -> tuple[jax.Array, jax.Array]:
  """The RoPE positions of a step's queries and of every cache slot.

  Args:
    layer: the cache after `append`; old_lengths [batch, kv_heads] its lengths before it.
    q_positions: [batch, T] the queries' original positions.
    mode: "original" (each entry keeps the position it had in the prompt) or "contiguous"
      (entries re-numbered 0..n-1 per head after every eviction, as the Locret code does; a
      query sits right after its head's live entries).
  Returns:
    (q_pos [batch, kv_heads, T], k_pos [batch, kv_heads, capacity]) int32.
  """
  batch, num_kv, capacity = layer.positions.shape
  steps = q_positions.shape[1]
  if mode == "original":
    return (jnp.broadcast_to(q_positions[:, None, :], (batch, num_kv, steps)),
            layer.positions)
  if mode == "contiguous":
    slots = jnp.arange(capacity, dtype=jnp.int32)
    return (old_lengths[..., None] + jnp.arange(steps, dtype=jnp.int32),
            jnp.broadcast_to(slots, (batch, num_kv, capacity)))
  raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {mode!r}")


def _rope_per_head(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """x [batch, kv_heads, seq, n, head_dim] rotated by positions [batch, kv_heads, seq]
  (RoPE with a position per KV head: heads fold into the batch of `apply_rope`)."""
  b, kh, s, n, d = x.shape
  out = apply_rope(x.reshape(b * kh, s, n, d), positions.reshape(b * kh, s), base)
  return out.reshape(x.shape)


def attend(q: jax.Array, layer: EvictingLayerKV, old_lengths: jax.Array, q_pos: jax.Array,
           k_pos: jax.Array, rope_base: float) -> tuple[jax.Array, jax.Array]:
  """Grouped-query attention of a step's queries over each head's live entries.

  Query t of the step sees, per KV head, the entries cached before the step and the step's
  tokens up to itself (its own key is at slot old_lengths + t); free slots are never seen.
  A jnp implementation: it materialises the [T, capacity] scores, fine for chunks of a few
  thousand tokens.

  Args:
    q: [batch, T, heads, head_dim] pre-RoPE queries.
    layer: the cache after `append` (the step's keys and values written).
    old_lengths: [batch, kv_heads] lengths before the append.
    q_pos, k_pos: from `rope_positions`.
  Returns:
    (out [batch, T, heads, head_dim] in q.dtype, probs [batch, kv_heads, group, T, capacity]
    float32: each query's attention weights, zero on invisible slots). If an append ever ran
    past the capacity (a bug in the caller's sizing), `out` is NaN rather than silently wrong.
  """
  batch, steps, heads, head_dim = q.shape
  num_kv, capacity = layer.k.shape[1], layer.k.shape[2]
  group = heads // num_kv
  qg = q.reshape(batch, steps, num_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
  qg = _rope_per_head(qg, q_pos, rope_base)                       # [b, K, T, G, d]
  k = _rope_per_head(layer.k[:, :, :, None], k_pos, rope_base)[:, :, :, 0]
  v = layer.v
  scores = jnp.einsum("bktgd,bksd->bkgts", qg, k.astype(qg.dtype),
                      preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(head_dim).astype(np.float32)
  slots = jnp.arange(capacity)
  last_visible = old_lengths[:, :, None] + jnp.arange(steps)       # [b, K, T]
  visible = slots[None, None, None, :] <= last_visible[..., None]  # [b, K, T, S]
  scores = jnp.where(visible[:, :, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)  # every query sees at least its own slot
  out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out.reshape(batch, steps, heads, head_dim).astype(q.dtype)
  overflow = jnp.any(old_lengths + steps > capacity)
  return jnp.where(overflow, jnp.nan, out), probs


def evict(layer: EvictingLayerKV, budget: jax.Array, n_stabilizers: int,
          n_sinks: int) -> EvictingLayerKV:
  """Keeps the top-`budget[h]` entries of every (row, head) and compacts them in position order.

  Selection key: the entry's score, +inf for the `n_stabilizers` most recent live entries and
  for the sinks (original position < n_sinks), so those are always kept (the caller checks
  n_stabilizers + n_sinks <= budget). NaN scores rank lowest. Ties keep the earlier entry.

  Args:
    layer: the cache (scores set by the scorer for every live entry).
    budget: [kv_heads] int entries to keep per head (a row keeps all when it has fewer).
  Returns:
    The cache with lengths = min(budget, lengths), kept entries in slots [0, lengths) sorted by
    position; k, v, positions and raw scores move with their entries.
  """
  capacity = layer.capacity
  slots = jnp.arange(capacity)
  lengths = layer.lengths[..., None]
  live = slots < lengths
  protected = (slots >= lengths - n_stabilizers) | (layer.positions < n_sinks)
  key = jnp.where(jnp.isnan(layer.scores), -jnp.inf, layer.scores)
  key = jnp.where(live, jnp.where(protected, jnp.inf, key), -jnp.inf)
  order = jnp.argsort(-key, axis=-1, stable=True)   # best first; ties: lower slot first
  rank = jnp.argsort(order, axis=-1)                # rank of every slot
  keep_n = jnp.minimum(jnp.asarray(budget, jnp.int32)[None, :], layer.lengths)
  keep = (rank < keep_n[..., None]) & live
  # Kept slots first, in slot order: live slots are in position order, so this re-sorts by
  # position; the evicted ones go behind them (free slots).
  new_order = jnp.argsort(jnp.where(keep, slots, capacity + slots), axis=-1)

  def gather(a):
    idx = new_order if a.ndim == 3 else new_order[..., None]
    return jnp.take_along_axis(a, idx, axis=2)

  return EvictingLayerKV(gather(layer.k), gather(layer.v), gather(layer.positions),
                         gather(layer.scores), jnp.sum(keep, axis=-1).astype(jnp.int32))
