"""The index format of the block-sparse attention kernels (splash attention's MaskInfo, per token).

Selections come per query token and KV head: `block_idx[b, t, h, :]`, the key blocks token t may
see (with `block_valid`). A kernel program handles `block_q` consecutive query tokens, so it visits
the union of their selections, in ascending block order, and masks each row to its own token's
blocks inside the tile. `query_block_unions` computes those unions:

  unions[b, h, qb, 0]      number of blocks in the union of query block qb (KV head h)
  unions[b, h, qb, 1 + u]  the u-th block of that union, ascending; 0 past the count

Packing the count into column 0 keeps one small int32 array per program (Triton block shapes
are powers of two; the width is padded to one). `block_index` adds the dk/dv kernel's transposed
index (the query tiles per key block, in work items of bounded length: `KeyBlockIndex`).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def next_power_of_2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _run_starts(x):
  """bool, along the last axis of a sorted x: where a run of equal values begins."""
  return jnp.concatenate([jnp.ones_like(x[..., :1], bool), x[..., 1:] != x[..., :-1]], axis=-1)


def _tile_ids(block_idx, block_valid, num_kv_blocks, block_q):
  """int32 [batch, kv_heads, q_blocks, block_q * topk]: the blocks a query tile's tokens selected,
  num_kv_blocks for a dead slot."""
  batch, q_len, kv_heads, topk = block_idx.shape
  if q_len % block_q:
    raise ValueError(f"block index: q_len={q_len} is not a multiple of block_q={block_q}")
  live = block_valid & (block_idx >= 0) & (block_idx < num_kv_blocks)
  ids = jnp.where(live, block_idx, num_kv_blocks).astype(jnp.int32)
  ids = ids.reshape(batch, q_len // block_q, block_q, kv_heads, topk).transpose(0, 3, 1, 2, 4)
  return ids.reshape(batch, kv_heads, q_len // block_q, block_q * topk)


def query_block_unions(block_idx: jax.Array, block_valid: jax.Array, *, num_kv_blocks: int,
                       block_q: int) -> jax.Array:
  """int32 [batch, kv_heads, q_len // block_q, width]: per query block, the count then the
  ascending union of the blocks its tokens selected. q_len must be a multiple of block_q.

  Two sorts of each tile's block_q x topk selected ids: the first finds repeats (the first of
  each run is kept), the second moves the kept ids to the front. Before 2026-12-06 this was the
  argsort of a [tiles x num_kv_blocks] selection bitmap, whose rows are 8x longer at 128k
  (2048 against 256 ids); see kernel_dkdv_run.md for the times.
  """
  max_len = min(num_kv_blocks, block_q * block_idx.shape[-1])
  ids = jnp.sort(_tile_ids(block_idx, block_valid, num_kv_blocks, block_q), axis=-1)
  first = _run_starts(ids) & (ids < num_kv_blocks)
  count = jnp.sum(first, axis=-1, dtype=jnp.int32)
  order = jnp.sort(jnp.where(first, ids, num_kv_blocks), axis=-1)[..., :max_len]
  order = jnp.where(jnp.arange(max_len) < count[..., None], order, 0)
  width = next_power_of_2(max_len + 1)
  pad = jnp.zeros((*count.shape, width - max_len - 1), jnp.int32)
  return jnp.concatenate([count[..., None], order, pad], axis=-1)


class KeyBlockIndex(NamedTuple):
  """The dk/dv kernel's transposed index: which query tiles' unions hold each key block, cut into
  work items of at most `chunk` tiles so that no program's loop is longer than that.

    tiles[b, h, :]        the query tiles, grouped by key block (ascending within each), a flat
                          list (CSR) with one entry per slot of the unions;
    items[b, h, i]        (key block, start in tiles, count, 0): work item i; key blocks come in
                          ascending order, a block's items consecutive; past the last item the
                          key block is num_kv_blocks and the count 0;
    block_items[b, h, kb] (first item, number of items) of key block kb (0 items: never seen).

  Why items: the init block is in every query tile's union (a forced block), the local ones in
  those of the next local_blocks blocks, and early blocks are popular picks. With one program per
  key block, block 0's program loops over all q_len / block_q tiles while the others finish:
  on the H100 at 32k that one loop was the dk/dv kernel's 34 ms, 3.6x the dq kernel
  (experiments/results/kernel_profile_run.md). Items of at most `chunk` tiles spread it: the
  kernel took 19.6-22.4 ms at 32k and 95.8 ms at 128k (from 151.4), and 70.5 ms at 128k once it
  read Q and dO as row-major 2D tiles (kernel_dkdv_run.md).
  """
  tiles: jax.Array
  items: jax.Array
  block_items: jax.Array
  # bits[b, h, e]: which of tiles[b, h, e]'s tokens selected the entry's key block (bit i for
  # token i; `union_token_bits`' word), for tiles of at most 32 tokens; None unless asked for
  # (`block_index(token_bits=True)`, the Mosaic dK/dV kernel's row mask).
  bits: jax.Array | None = None


def max_items(q_blocks: int, union_slots: int, num_kv_blocks: int, chunk: int) -> int:
  """A static bound on the work items: every item but a key block's last is full (chunk tiles),
  and the tiles number at most q_blocks x union_slots."""
  return -(-q_blocks * union_slots // chunk) + num_kv_blocks


def block_index(block_idx: jax.Array, block_valid: jax.Array, *, num_kv_blocks: int,
                block_q: int, chunk: int,
                token_bits: bool = False) -> tuple[jax.Array, KeyBlockIndex]:
  """(unions, KeyBlockIndex): the forward/dq kernels' unions (`query_block_unions`) and the dk/dv
  kernel's transposed index, so that each dk/dv program loops over at most `chunk` of the query
  tiles whose union holds its key block (no atomics: the items' partial sums are added per key
  block afterwards). chunk: a positive int (`Launch.check` validates the op's).

  The transposed index is a flat list (CSR) rather than one padded row per key block: a row
  would need room for every query tile (key block 0 can be in all their unions), and with the
  small tiles of heads_per_program > 1 that is large: at 128k tokens and 4-token tiles, 2048
  rows of 65536 int32 (512 MiB) per KV head, and an argsort as large. The list has one entry per
  slot of the unions, q_len / block_q x min(num_kv_blocks, block_q x topk) (dead slots sort past
  every key block's range).

  token_bits: also carry each entry's token word (`KeyBlockIndex.bits`) through the sort, for
  block_q <= 32 (the unions are then `union_token_bits`', the same as `query_block_unions`').
  """
  if token_bits:
    if block_q > 32:
      raise ValueError(f"block_index: token_bits needs tiles of at most 32 tokens (one int32 "
                       f"word), got block_q={block_q}")
    unions, bits = union_token_bits(block_idx, block_valid, num_kv_blocks=num_kv_blocks,
                                    tile_tokens=block_q)
  else:
    unions = query_block_unions(block_idx, block_valid, num_kv_blocks=num_kv_blocks,
                                block_q=block_q)
  max_len = min(num_kv_blocks, block_q * block_idx.shape[-1])
  batch, kv_heads, nqb = unions.shape[:3]
  count = unions[..., :1]
  slots = unions[..., 1:1 + max_len]
  # Dead slots sort last (key num_kv_blocks); within a key block the query tiles come out
  # ascending. Where it fits, one int32 key (row, key block, tile), row = b * kv_heads + h, holds
  # all three, and the whole index is one 1D sort: XLA's GPU backend gives a single long sort to
  # CUB's radix sort, where a batch of 2 rows of millions of keys went to its bitonic sort,
  # dozens of launches (`sort_20_1__*` in the profiles). Else the pairs are sorted per row,
  # by block, stably.
  blocks = jnp.where(jnp.arange(max_len) < count, slots, num_kv_blocks)
  tiles = jnp.broadcast_to(jnp.arange(nqb, dtype=jnp.int32)[:, None], blocks.shape)
  flat = (batch, kv_heads, nqb * max_len)
  # The token words, if asked for, ride along as the sort's payload.
  words = [bits[..., 0, 1:1 + max_len]] if token_bits else []
  if batch * kv_heads * (num_kv_blocks + 1) * nqb < 2**31:
    row = jnp.arange(batch * kv_heads, dtype=jnp.int32).reshape(batch, kv_heads, 1, 1)
    packed = ((row * (num_kv_blocks + 1) + blocks) * nqb + tiles).reshape(-1)
    packed, *words = jax.lax.sort((packed, *(w.reshape(-1) for w in words)), num_keys=1)
    packed = packed.reshape(flat)  # every row holds nqb * max_len keys, so rows stay apart
    kv_blocks, kv_tiles = packed // nqb % (num_kv_blocks + 1), packed % nqb
  else:
    kv_blocks, kv_tiles, *words = jax.lax.sort(
        (blocks.reshape(flat), tiles.reshape(flat), *(w.reshape(flat) for w in words)),
        dimension=-1, is_stable=True, num_keys=1)
  words = [w.reshape(flat) for w in words]
  # Each key block's run in the sorted list: where it starts, and how many tiles.
  bounds = jax.vmap(jax.vmap(lambda x: jnp.searchsorted(
      x, jnp.arange(num_kv_blocks + 1, dtype=jnp.int32), side="left")))(kv_blocks)
  start = bounds[..., :-1].astype(jnp.int32)
  per_block = (bounds[..., 1:] - bounds[..., :-1]).astype(jnp.int32)  # [b, h, num_kv_blocks]
  n_chunks = -(-per_block // chunk)
  ends = jnp.cumsum(n_chunks, axis=-1, dtype=jnp.int32)
  n_items = max_items(nqb, max_len, num_kv_blocks, chunk)
  item = jnp.arange(n_items, dtype=jnp.int32)
  # Each item's key block: the first whose items end past it (num_kv_blocks past the last).
  owner = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, item, side="right")))(ends)
  owner = owner.astype(jnp.int32)
  at = lambda x: jnp.take_along_axis(x, jnp.minimum(owner, num_kv_blocks - 1), axis=-1)
  j = item - (at(ends) - at(n_chunks))                             # the item's rank in its block
  live = owner < num_kv_blocks
  items = jnp.stack([owner, jnp.where(live, at(start) + j * chunk, 0),
                     jnp.where(live, jnp.minimum(at(per_block) - j * chunk, chunk), 0),
                     jnp.zeros_like(owner)], axis=-1)
  block_items = jnp.stack([ends - n_chunks, n_chunks], axis=-1)
  return unions, KeyBlockIndex(kv_tiles, items, block_items, words[0] if token_bits else None)


def union_token_bits(block_idx: jax.Array, block_valid: jax.Array, *, num_kv_blocks: int,
                     tile_tokens: int) -> tuple[jax.Array, jax.Array]:
  """(unions, bits): the unions of tiles of `tile_tokens` query tokens (`query_block_unions`'
  format) and, per union slot, which of the tile's tokens selected the block:

    bits[b, h, tile, j, 1 + u]  bit i set when token 32 j + i of the tile selected block
                                unions[b, h, tile, 1 + u]; int32, column 0 and dead slots 0

  The Mosaic GPU forward (`forward_mosaic.py`) masks a row by its token's bit, one scalar per
  visited block, where the Triton kernels compare each row against its token's topk selected ids.

  One sort of the tile's (block, token) keys: duplicates removed, each block's run of tokens
  summed into its words (a prefix sum minus the sum before the run; the tokens in a run are
  distinct, so the sum is their OR), then the run ends sorted to the front with their words.
  """
  batch, q_len, kv_heads, topk = block_idx.shape
  if tile_tokens < 1 or tile_tokens & (tile_tokens - 1):
    raise ValueError(f"union_token_bits: tile_tokens must be a power of two, got {tile_tokens}")
  ids = _tile_ids(block_idx, block_valid, num_kv_blocks, tile_tokens)
  length = ids.shape[-1]
  token = jnp.arange(length, dtype=jnp.int32) // topk
  keys = jnp.sort(ids * tile_tokens + token, axis=-1)
  block, token = keys // tile_tokens, keys % tile_tokens
  live = block < num_kv_blocks
  new_key = _run_starts(keys) & live
  run_start = _run_starts(block)
  run_end = jnp.concatenate([block[..., 1:] != block[..., :-1],
                             jnp.ones_like(block[..., :1], bool)], axis=-1) & live
  position = jnp.arange(length, dtype=jnp.int32)
  start = lax.cummax(jnp.where(run_start, position, 0), axis=ids.ndim - 1)
  words = []
  for j in range(-(-tile_tokens // 32)):
    bit = jnp.where(new_key & (token // 32 == j),
                    jnp.left_shift(jnp.uint32(1), (token % 32).astype(jnp.uint32)), jnp.uint32(0))
    total = jnp.cumsum(bit, axis=-1, dtype=jnp.uint32)  # wraps mod 2^32; differences stay exact
    before = jnp.take_along_axis(total - bit, start, axis=-1)
    words.append(lax.bitcast_convert_type(total - before, jnp.int32))
  max_len = min(num_kv_blocks, length)
  ends = jnp.where(run_end, block, num_kv_blocks)
  ends, *words = lax.sort((ends, *words), dimension=ids.ndim - 1, num_keys=1)
  count = jnp.sum(run_end, axis=-1, dtype=jnp.int32)
  in_union = jnp.arange(max_len) < count[..., None]
  width = next_power_of_2(max_len + 1)
  pad = lambda x, first: jnp.concatenate(
      [first, jnp.where(in_union, x[..., :max_len], 0),
       jnp.zeros((*count.shape, width - max_len - 1), jnp.int32)], axis=-1)
  unions = pad(ends, count[..., None])
  bits = jnp.stack([pad(w, jnp.zeros_like(count[..., None])) for w in words], axis=-2)
  return unions, bits
