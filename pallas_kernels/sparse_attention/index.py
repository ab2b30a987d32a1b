"""The index format of the block-sparse attention kernels (splash attention's MaskInfo, per token).

Selections come per query token and KV head: `block_idx[b, t, h, :]`, the key blocks token t may
see (with `block_valid`). A kernel program handles `block_q` consecutive query tokens, so it visits
the union of their selections, in ascending block order, and masks each row to its own token's
blocks inside the tile. `query_block_unions` computes those unions:

  unions[b, h, qb, 0]      number of blocks in the union of query block qb (KV head h)
  unions[b, h, qb, 1 + u]  the u-th block of that union, ascending; 0 past the count

Packing the count into column 0 keeps one small int32 array per program (Triton block shapes
are powers of two; the width is padded to one).
"""
import jax
import jax.numpy as jnp


def next_power_of_2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _selection_bitmap(block_idx, block_valid, num_kv_blocks, block_q):
  """bool [batch, kv_heads, q_blocks, num_kv_blocks]: some token of the query block selected
  the key block."""
  batch, q_len, kv_heads, topk = block_idx.shape
  if q_len % block_q:
    raise ValueError(f"block index: q_len={q_len} is not a multiple of block_q={block_q}")
  nqb = q_len // block_q
  live = block_valid & (block_idx >= 0) & (block_idx < num_kv_blocks)
  idx = jnp.where(live, block_idx, num_kv_blocks)  # dead slots land in a spare column
  idx = idx.reshape(batch, nqb, block_q, kv_heads, topk).transpose(0, 3, 1, 2, 4)
  idx = idx.reshape(batch, kv_heads, nqb, block_q * topk)
  b_ix = jnp.arange(batch)[:, None, None, None]
  h_ix = jnp.arange(kv_heads)[None, :, None, None]
  q_ix = jnp.arange(nqb)[None, None, :, None]
  bitmap = jnp.zeros((batch, kv_heads, nqb, num_kv_blocks + 1), bool)
  return bitmap.at[b_ix, h_ix, q_ix, idx].set(True)[..., :num_kv_blocks]


def _count_and_list(bitmap, max_len: int) -> jax.Array:
  """[..., n] bool -> int32 [..., width]: the count, then the ascending indices of the set bits."""
  count = jnp.sum(bitmap, axis=-1, dtype=jnp.int32)
  order = jnp.argsort(~bitmap, axis=-1, stable=True)[..., :max_len].astype(jnp.int32)
  order = jnp.where(jnp.arange(max_len) < count[..., None], order, 0)
  width = next_power_of_2(max_len + 1)
  pad = jnp.zeros((*count.shape, width - max_len - 1), jnp.int32)
  return jnp.concatenate([count[..., None], order, pad], axis=-1)


def query_block_unions(block_idx: jax.Array, block_valid: jax.Array, *, num_kv_blocks: int,
                       block_q: int) -> jax.Array:
  """int32 [batch, kv_heads, q_len // block_q, width]: per query block, the count then the
  ascending union of the blocks its tokens selected. q_len must be a multiple of block_q."""
  bitmap = _selection_bitmap(block_idx, block_valid, num_kv_blocks, block_q)
  return _count_and_list(bitmap, min(num_kv_blocks, block_q * block_idx.shape[-1]))


def block_index(block_idx: jax.Array, block_valid: jax.Array, *, num_kv_blocks: int,
                block_q: int) -> tuple[jax.Array, jax.Array]:
  """(query_block_unions, kv_block_queries) for the forward/dq and the dk/dv kernels.

  kv_block_queries[b, h, kb, 0] is the number of query blocks whose union holds key block kb,
  followed by those query blocks ascending: the transposed index, so that each key block's
  program loops only over the query rows that selected it (no atomics).
  """
  bitmap = _selection_bitmap(block_idx, block_valid, num_kv_blocks, block_q)
  unions = _count_and_list(bitmap, min(num_kv_blocks, block_q * block_idx.shape[-1]))
  transposed = jnp.swapaxes(bitmap, -1, -2)
  return unions, _count_and_list(transposed, transposed.shape[-1])
