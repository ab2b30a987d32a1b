"""NOSA's offloaded decode: the KV cache in host memory, a device buffer of a few blocks.

A sparse decode step reads only its selected blocks, so the whole cache need not live in HBM:
the full K/V stay in host memory and the device holds, per row and KV head, `slots` blocks of
`block_size` tokens, the last step's selection. Each step diffs its new selection against the
buffer and copies only the blocks it lacks host-to-device (PCIe, ~25-50 GB/s, against HBM's
~3 TB/s, which is why NOSA trains its selection for locality: `sparsejax.eval.locality`). The
memory this frees is what buys larger batches (NOSA's decoding-throughput claim).

The layout follows NOSA's inference system (thunlp/NOSA, nosi/cache_engine.py, read, not
copied): `slots` = topk; the last slot always holds the row's own, partly written block (its
new tokens are written to it and to host memory); the other slots hold selected blocks. The
diff keeps a slot whose block is still selected in place and gives the k-th newly needed block
the k-th slot not kept (`plan_transfers`). Attention then runs over the buffer as if it were
the cache (`sparse_decode` over slot indices, with the eviction scores as the keys' bias).

The state is one layer's; the caller computes the selection (e.g. `sparsejax.ops.nosa.
nosa_select_decode_blocks` from compressed keys and eviction scores it keeps on the device,
which are small) and owns the cache bookkeeping. Host arrays are placed in the backend's
pinned host memory when it has one (`host_memory_kind`). Packed rows (segment ids) are not
supported here yet.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.sparse_decode import sparse_decode


@flax.struct.dataclass
class OffloadedKV:
  host_k: jax.Array      # [b, capacity, kv_heads, d] in host memory: the whole cache
  host_v: jax.Array
  slot_k: jax.Array      # [b, slots * block_size, kv_heads, d] on the device: the buffer
  slot_v: jax.Array
  slot_bias: jax.Array   # [b, slots * block_size, kv_heads] float32: the buffered keys' scores
  slot_block: jax.Array  # [b, kv_heads, slots - 1] int32: the block in each regular slot, or -1
  block_size: int = flax.struct.field(pytree_node=False, default=64)

  @property
  def slots(self) -> int:
    return self.slot_k.shape[1] // self.block_size


def host_memory_kind() -> str | None:
  """"pinned_host" where the default device offers it (GPU, CPU), else None (device memory)."""
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  return "pinned_host" if "pinned_host" in kinds else None


def _placed(x: jax.Array, kind: str | None) -> jax.Array:
  if host_memory_kind() is None:   # no host memory space: everything stays where it is
    return x
  return jax.device_put(x, jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind))


def to_host(x: jax.Array) -> jax.Array:
  return _placed(x, host_memory_kind())


def _to_device(x: jax.Array) -> jax.Array:
  return _placed(x, "device")


def offload(k: jax.Array, v: jax.Array, *, slots: int, block_size: int = 64) -> OffloadedKV:
  """A prefilled cache k, v [b, capacity, kv_heads, d] moved to host memory, with an empty
  device buffer of `slots` blocks (the first step loads what it selects)."""
  if slots < 2:
    raise ValueError(f"offload: slots must be >= 2 (one for the row's own block), got {slots}")
  b, _, kvh, d = k.shape
  buf = (b, slots * block_size, kvh, d)
  return OffloadedKV(to_host(k), to_host(v), jnp.zeros(buf, k.dtype), jnp.zeros(buf, v.dtype),
                     jnp.zeros(buf[:3], jnp.float32),
                     jnp.full((b, kvh, slots - 1), -1, jnp.int32), block_size)


def plan_transfers(slot_block: jax.Array, want: jax.Array, own: jax.Array):
  """The diff of one step. slot_block [b, kvh, R] (R = slots - 1 regular slots; -1 empty), want
  [b, kvh, K] the selected blocks (-1 unused; the row's own block `own` [b] among them goes to
  the last slot, not here), K - 1 <= R. Returns (slot_block after the step, load bool [b, kvh,
  R]: the slot's block must be copied in, live bool [b, kvh, R]: the slot holds a selected
  block)."""
  regular = (want >= 0) & (want != own[:, None, None])                  # [b, kvh, K]
  held = slot_block[..., :, None] == jnp.where(regular, want, -2)[..., None, :]  # [.., R, K]
  keep = jnp.any(held, axis=-1)                                          # slot still selected
  need = regular & ~jnp.any(held, axis=-2)                               # block not in a slot
  need_rank = jnp.cumsum(need, axis=-1) - 1                              # [b, kvh, K]
  free_rank = jnp.cumsum(~keep, axis=-1) - 1                             # [b, kvh, R]
  match = (~keep)[..., :, None] & need[..., None, :] \
      & (free_rank[..., :, None] == need_rank[..., None, :])             # [b, kvh, R, K]
  load = jnp.any(match, axis=-1)
  incoming = jnp.max(jnp.where(match, want[..., None, :], -1), axis=-1)
  new_block = jnp.where(load, incoming, slot_block)
  return new_block, load, keep | load


def _copy_blocks(state: OffloadedKV, new_block, load, evict):
  """Copies the to-load blocks from host memory into their slots (one block's K and V at a
  time, over the loads only: the bytes moved are the misses), and every live slot's bias from
  the device-resident scores evict [b, capacity, kvh]."""
  B = state.block_size
  b, kvh, r = load.shape
  flat = load.reshape(-1)
  order = jnp.argsort(~flat, stable=True)            # the loads first
  count = jnp.sum(flat)

  def body(i, bufs):
    slot_k, slot_v = bufs
    j = order[i]
    row, head, slot = j // (kvh * r), (j // r) % kvh, j % r
    start = new_block[row, head, slot] * B
    k = jax.lax.dynamic_slice(state.host_k, (row, start, head, 0), (1, B, 1, state.host_k.shape[3]))
    v = jax.lax.dynamic_slice(state.host_v, (row, start, head, 0), (1, B, 1, state.host_v.shape[3]))
    k, v = _to_device(k), _to_device(v)
    at = (row, slot * B, head, 0)
    return (jax.lax.dynamic_update_slice(slot_k, k, at),
            jax.lax.dynamic_update_slice(slot_v, v, at))

  slot_k, slot_v = jax.lax.fori_loop(0, count, body, (state.slot_k, state.slot_v))
  # Biases of every regular slot from the device copy of the scores (4 bytes a key).
  pos = jnp.maximum(new_block, 0)[..., None] * B + jnp.arange(B)        # [b, kvh, R, B]
  bias = jnp.take_along_axis(jnp.swapaxes(evict, 1, 2)[:, :, None, :],
                             jnp.minimum(pos, evict.shape[1] - 1), axis=-1)
  bias = jnp.transpose(bias.reshape(b, kvh, r * B), (0, 2, 1))          # [b, R*B, kvh]
  slot_bias = state.slot_bias.at[:, :r * B].set(bias)
  return slot_k, slot_v, slot_bias


def write_token(state: OffloadedKV, k: jax.Array, v: jax.Array, evict_new: jax.Array,
                pos: jax.Array) -> OffloadedKV:
  """Writes one token per row (k, v [b, kvh, d], its eviction scores [b, kvh]) at positions
  pos [b]: to host memory, and to the row's own block in the last slot."""
  B, slots = state.block_size, state.slots
  rows = jnp.arange(k.shape[0])
  tail = (slots - 1) * B + pos % B
  host_k, host_v = state.host_k, state.host_v
  for r in range(k.shape[0]):  # host memory takes updates at scalar offsets: one per row
    put = lambda buf, x: jax.lax.dynamic_update_slice(
        buf, _placed(x[r][None, None].astype(buf.dtype), host_memory_kind()), (r, pos[r], 0, 0))
    host_k, host_v = put(host_k, k), put(host_v, v)
  return state.replace(
      host_k=host_k, host_v=host_v,
      slot_k=state.slot_k.at[rows, tail].set(k.astype(state.slot_k.dtype)),
      slot_v=state.slot_v.at[rows, tail].set(v.astype(state.slot_v.dtype)),
      slot_bias=state.slot_bias.at[rows, tail].set(evict_new.astype(jnp.float32)))


def fill_own_block(state: OffloadedKV, evict: jax.Array, pos: jax.Array) -> OffloadedKV:
  """Loads each row's own block (the one holding position pos [b]) from host memory into the
  last slot: after `offload`, before the first step."""
  B, slots = state.block_size, state.slots
  start = (pos // B) * B
  # Host memory takes slices at scalar offsets, not gathers: one slice per row.
  take = lambda x, r: _to_device(jax.lax.dynamic_slice_in_dim(x[r], start[r], B, axis=0))
  rows = range(state.host_k.shape[0])
  k = jnp.stack([take(state.host_k, r) for r in rows])
  v = jnp.stack([take(state.host_v, r) for r in rows])
  bias = jnp.stack([jax.lax.dynamic_slice_in_dim(evict[r].astype(jnp.float32), start[r], B)
                    for r in rows])
  at = (slots - 1) * B
  return state.replace(slot_k=state.slot_k.at[:, at:].set(k), slot_v=state.slot_v.at[:, at:].set(v),
                       slot_bias=state.slot_bias.at[:, at:].set(bias))


def offloaded_attend(q: jax.Array, state: OffloadedKV, block_idx: jax.Array, evict: jax.Array,
                     pos: jax.Array, *, implementation: str = "pallas"):
  """One decode step's attention over the device buffer: (out [b, heads, d], the new state,
  stats {"hits", "loads"} [b, kvh]).

  q [b, heads, d] at positions pos [b] (the cache holds [0, pos], this token written by
  `write_token`); block_idx [b, kvh, K] the step's selection (K <= slots; -1 unused; the own
  block pos // block_size among them); evict [b, capacity, kvh] the eviction scores, on the
  device. Equals `sparse_decode` of q over the whole cache with block_idx and key_bias=evict.
  The own block must be selected and K <= slots (NOSA's local window forces the own block), so
  the other selected blocks always fit the slots - 1 regular slots."""
  B = state.block_size
  own = pos // B
  new_block, load, live = plan_transfers(state.slot_block, block_idx, own)
  slot_k, slot_v, slot_bias = _copy_blocks(state, new_block, load, evict)
  r = new_block.shape[-1]
  slot_ids = jnp.arange(r + 1, dtype=jnp.int32)
  own_selected = jnp.any(block_idx == own[:, None, None], axis=-1, keepdims=True)
  idx = jnp.where(jnp.concatenate([live, own_selected], axis=-1), slot_ids, -1)
  lengths = r * B + pos % B + 1       # the own block's written part; regular slots are whole
  out, _ = sparse_decode(q, slot_k, slot_v, idx, None, lengths, block_size=B, key_bias=slot_bias,
                         implementation=implementation)
  hits = jnp.sum(live & ~load, axis=-1)
  new_state = state.replace(slot_k=slot_k, slot_v=slot_v, slot_bias=slot_bias,
                            slot_block=new_block)
  return out, new_state, {"hits": hits, "loads": jnp.sum(load, axis=-1)}
