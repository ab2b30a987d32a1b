"""Block-sparse flash attention, backward, as two Pallas kernels (Triton lowering).

Both use the forward's tiles: `heads_per_program` (hp) query heads of one KV head x `block_q`
query tokens, the rows being the (token, head) pairs, token-major (hp = 1: one head x block_q
tokens). With per-token selections a tile's union grows with its tokens, so spending the 64 rows
on hp heads of 64 / hp tokens (which share their selections) is what keeps the work small.

  dq:     one program = one tile, looping over the union of key blocks its tokens selected (the
          forward's loop and index), recomputing the probabilities from the forward's logsumexp.
  dk, dv: one program = one KV head x one work item: up to `chunk` of the query tiles whose union
          holds one key block (the transposed index, `index.KeyBlockIndex`), looping over them
          and, for each, over the group's chunks of hp heads; it writes the block's partial
          sums (fp32), and a second small kernel adds each key block's items in order. So no
          program's loop is longer than `chunk` tiles (the init block is in every tile's union),
          and there are no atomics: the gradients are deterministic.

Both mask each row exactly as the forward does: its token's own selected blocks, causality and
equal segment ids. delta = rowsum(dO * O) - dLSE comes from outside (one fused XLA reduction; the
logsumexp output's own cotangent enters there, since dLSE/dlogits = P).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention import backward_mosaic
from pallas_kernels.sparse_attention.forward import LOG2E, per_row, visible_tile
from pallas_kernels.sparse_attention.index import KeyBlockIndex


def _probs_and_dlogits(q, k, v, do, lse2, delta, visible, scale):
  """Recomputed probabilities P and dS = P * (dP - delta) for one (query rows x key block) tile."""
  logits2 = plgpu.dot(q, k.T) * (scale * LOG2E)
  p = jnp.where(visible, jnp.exp2(logits2 - lse2[:, None]), 0.0)
  dp = plgpu.dot(do, v.T)
  return p, p * (dp - delta[:, None])


def _dq_kernel(q_ref, k_ref, v_ref, sel_ref, q_seg_ref, kv_seg_ref, union_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, scale: float, block_q: int, block_k: int,
               heads_per_program: int):
  query_block = pl.program_id(0)
  hp = heads_per_program
  rows = block_q * hp
  q = q_ref[...]
  head_dim = q.shape[-1]
  q = q.reshape(rows, head_dim)   # [block_q, hp, d] -> (token, head) rows, as the forward
  do = do_ref[...].reshape(rows, head_dim)
  lse2 = lse_ref[...]              # [rows], base 2 (see `_row_major`)
  delta = delta_ref[...]
  selected_blocks = sel_ref[...]
  q_seg = q_seg_ref[...]
  q_pos = query_block * block_q + jnp.arange(block_q)

  def body(u, dq):
    block = union_ref[u + 1]
    keys = pl.ds(block * block_k, block_k)
    k = k_ref[keys, :]
    v = v_ref[keys, :]
    visible = visible_tile(selected_blocks, block, q_pos, block * block_k + jnp.arange(block_k),
                           q_seg, kv_seg_ref[keys])
    _, ds = _probs_and_dlogits(q, k, v, do, lse2, delta, per_row(visible, hp), scale)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, union_ref[0], body, jnp.zeros((rows, head_dim), jnp.float32))
  dq = dq * scale
  if hp > 1:
    dq = dq.reshape(block_q, hp, head_dim)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, sel_ref, q_seg_ref, kv_seg_ref, item_ref, tiles_ref,
                 do_ref, lse_ref, delta_ref, *refs, scale: float, block_q: int, block_k: int,
                 group: int, heads_per_program: int, num_kv_blocks: int, dq_atomic: bool):
  """One work item (`index.KeyBlockIndex`): its key block's partial dK / dV (unscaled, fp32) over
  the item's query tiles. A dead item (past the last) writes zeros that no block sums. With
  dq_atomic it also adds each tile's dS K (unscaled, fp32) into the row-major dQ accumulator."""
  if dq_atomic:
    _, dk_ref, dv_ref, dq_ref = refs  # the accumulator's input is its output (aliased)
  else:
    dk_ref, dv_ref = refs
  kv_head = pl.program_id(2)
  hp = heads_per_program
  rows = block_q * hp
  chunks = group // hp           # the tile's hp heads are one chunk of the KV head's group
  key_block = jnp.minimum(item_ref[0], num_kv_blocks - 1)
  first, count = item_ref[1], item_ref[2]
  keys = pl.ds(key_block * block_k, block_k)
  k = k_ref[keys, :]
  v = v_ref[keys, :]
  k_seg = kv_seg_ref[keys]
  k_pos = key_block * block_k + jnp.arange(block_k)

  def over_query_tiles(i, carry):
    query_block = tiles_ref[first + i]
    tokens = pl.ds(query_block * block_q, block_q)
    q_pos = query_block * block_q + jnp.arange(block_q)
    visible = per_row(visible_tile(sel_ref[tokens, :], key_block, q_pos, k_pos,
                                   q_seg_ref[tokens], k_seg), hp)
    tile_rows = pl.ds(query_block * rows, rows)

    def over_head_chunks(c, carry):
      dk, dv = carry
      chunk = kv_head * chunks + c
      q = q_ref[chunk, tile_rows, :]
      do = do_ref[chunk, tile_rows, :]
      lse2 = lse_ref[chunk, tile_rows]
      delta = delta_ref[chunk, tile_rows]
      p, ds = _probs_and_dlogits(q, k, v, do, lse2, delta, visible, scale)
      dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
      dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
      if dq_atomic:
        plgpu.atomic_add(dq_ref, (chunk, tile_rows, slice(None)),
                         plgpu.dot(ds.astype(k.dtype), k))
      return dk, dv

    if chunks == 1:  # no loop of one iteration: the tile loop stays innermost (Triton pipelines it)
      return over_head_chunks(0, carry)
    return lax.fori_loop(0, chunks, over_head_chunks, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, count, over_query_tiles, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def _sum_items_kernel(block_items_ref, dk_part_ref, dv_part_ref, dk_ref, dv_ref, *,
                      scale: float):
  """One key block: the sum of its items' partial dK / dV, in a fixed order (deterministic)."""
  first, count = block_items_ref[0], block_items_ref[1]

  def body(j, carry):
    dk, dv = carry
    return dk + dk_part_ref[first + j], dv + dv_part_ref[first + j]

  zeros = jnp.zeros(dk_ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, count, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _row_major(x, hp: int):
  """[b, heads, t] -> [b, heads // hp, t * hp]: a tile's rows (token-major (token, head) pairs of
  hp heads) become one contiguous run, so the kernels load them as a vector of the tile's rows
  without reshaping it (an XLA transpose of b x heads x t floats, next to nothing)."""
  batch, heads, length = x.shape
  x = x.reshape(batch, heads // hp, hp, length)
  return jnp.swapaxes(x, 2, 3).reshape(batch, heads // hp, length * hp)


def _row_major_vectors(x, hp: int):
  """[b, t, heads, d] -> [b, heads // hp, t * hp, d]: `_row_major` for the head_dim vectors."""
  batch, length, heads, head_dim = x.shape
  x = x.reshape(batch, length, heads // hp, hp, head_dim)
  return jnp.swapaxes(x, 1, 2).reshape(batch, heads // hp, length * hp, head_dim)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret", "dq_launch",
                                             "dkdv_launch", "heads_per_program", "dq_atomic",
                                             "dkdv_kernel", "mosaic_stages"))
def sparse_attention_backward(q, k, v, selected, q_segment_ids, kv_segment_ids, unions,
                              key_index: KeyBlockIndex, lse, delta, d_out, *, block_q: int,
                              block_k: int, interpret: bool = False,
                              dq_launch: tuple[int, int] = (4, 2),
                              dkdv_launch: tuple[int, int] = (4, 2), heads_per_program: int = 1,
                              dq_atomic: bool = False, dkdv_kernel: str = "triton",
                              mosaic_stages: int = 4):
  """Padded inputs as in `sparse_attention_forward` (with its block_q, heads_per_program and
  unions), the dk/dv kernel's index (`index.block_index` at the same block_q), the forward's lse
  [b, heads, t], delta [b, heads, t] (rowsum(dO * O) - dLSE) and the output cotangent.
  dq_launch / dkdv_launch: (num_warps, num_stages) of each kernel. dq_atomic: no dq kernel; the
  dk/dv kernel, which has dS already, adds dS K into an fp32 accumulator with atomics (one
  matmul where the dq kernel recomputes P and dS for it: two more; the sum's order, so its last
  bits, then vary from run to run). dkdv_kernel: "triton", or "mosaic" for the dK/dV partial
  sums of backward_mosaic.py (Hopper; key_index built with token_bits, one document per row,
  no dq_atomic), with `mosaic_stages` Q/dO slots. Returns (dq, dk, dv) like q, k, v."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  hp = heads_per_program
  topk = selected.shape[-1]
  scale = 1.0 / math.sqrt(head_dim)
  params = lambda launch: plgpu.CompilerParams(num_warps=launch[0], num_stages=launch[1])
  # A row that saw no key has lse -inf (and zero output): exp2(logits - -inf) = inf, which only
  # the mask would keep out of P and dS (inf * 0 = NaN one step off). As +inf its P is
  # exp2(-inf) = 0 by itself, so such a row contributes nothing whatever the mask.
  lse2 = _row_major(jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E), hp)
  delta = _row_major(delta, hp)

  head_block = None if hp == 1 else hp  # a squeezed head axis for one head per program
  kv_head = lambda h: h * hp // group
  q_tile = pl.BlockSpec((None, block_q, head_block, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_all = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, kv_head(h), 0))
  row_vec = pl.BlockSpec((None, None, block_q * hp), lambda i, b, h: (b, h, i))
  dq = None if dq_atomic else pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k,
                        heads_per_program=hp),
      grid=(q_len // block_q, batch, heads // hp),
      in_specs=[
          q_tile, kv_all, kv_all,
          pl.BlockSpec((None, block_q, None, topk), lambda i, b, h: (b, i, kv_head(h), 0)),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
          pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, None, None, unions.shape[-1]),
                       lambda i, b, h: (b, kv_head(h), i, 0)),
          q_tile, row_vec, row_vec,
      ],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params(dq_launch), interpret=interpret, name="sparse_attention_dq",
  )(q, k, v, selected, q_segment_ids, kv_segment_ids, unions, d_out, lse2, delta)

  # dK, dV: one program per work item writes its key block's partial sums, then one program
  # per key block adds its items' (`index.KeyBlockIndex` says why).
  n_items = key_index.items.shape[2]
  # Q and dO as row-major copies, so that a tile's rows are one 2D block (`_row_major_vectors`):
  # on the H100 at 128k the kernel took 70.5 ms against 95.9 ms loading [tokens, heads, d]
  # blocks and reshaping them; the copies themselves, two XLA transposes, took 2.8 ms there
  # (kernel_dkdv_run.md).
  q_in, do_in = _row_major_vectors(q, hp), _row_major_vectors(d_out, hp)
  block_items = key_index.block_items
  if dkdv_kernel == "mosaic":
    if dq_atomic:
      raise ValueError("sparse_attention_backward: dq_atomic needs the Triton dk/dv kernel")
    # Two parts per item (one per compute warpgroup), summed below like the Triton items.
    outputs = backward_mosaic.dkdv_parts_mosaic(
        q_in, k, v, do_in, lse2, delta, key_index.items, key_index.tiles, key_index.bits,
        heads_per_program=hp, group=group, stages=mosaic_stages, interpret=interpret)
    block_items = block_items * 2
    n_items *= 2
  else:
    outputs = _dkdv_triton(q_in, k, v, selected, q_segment_ids, kv_segment_ids, key_index, do_in,
                           lse2, delta, scale=scale, block_q=block_q, block_k=block_k, group=group,
                           hp=hp, dq_atomic=dq_atomic, launch=dkdv_launch, interpret=interpret)
  if dq_atomic:
    dk_part, dv_part, dq_rows = outputs
    dq = jnp.swapaxes((dq_rows * scale).reshape(batch, heads // hp, q_len, hp, head_dim), 1, 2)
    dq = dq.reshape(q.shape).astype(q.dtype)
  else:
    dk_part, dv_part = outputs

  parts = pl.BlockSpec((None, None, n_items, block_k, head_dim), lambda j, b, h: (b, h, 0, 0, 0))
  kv_tile = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_sum_items_kernel, scale=scale),
      grid=(kv_len // block_k, batch, kv_heads),
      in_specs=[pl.BlockSpec((None, None, None, 2), lambda j, b, h: (b, h, j, 0)), parts, parts],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params((4, 1)), interpret=interpret, name="sparse_attention_dkdv_sum",
  )(block_items, dk_part, dv_part)
  return dq, dk, dv


def _dkdv_triton(q_in, k, v, selected, q_segment_ids, kv_segment_ids, key_index, do_in, lse2,
                 delta, *, scale, block_q, block_k, group, hp, dq_atomic, launch, interpret):
  """The Triton dk/dv kernel over the work items: (dk_parts, dv_parts[, dq rows fp32])."""
  batch, _, q_len_hp, head_dim = q_in.shape
  q_len = q_len_hp // hp
  heads = q_in.shape[1] * hp
  kv_len, kv_heads = k.shape[1], k.shape[2]
  topk = selected.shape[-1]
  n_items = key_index.items.shape[2]
  q_all = pl.BlockSpec((None, heads // hp, q_len * hp, head_dim), lambda i, b, h: (b, 0, 0, 0))
  kv_all = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  rows_all = pl.BlockSpec((None, heads // hp, q_len * hp), lambda i, b, h: (b, 0, 0))
  part = pl.BlockSpec((None, None, None, block_k, head_dim), lambda i, b, h: (b, h, i, 0, 0))
  part_shape = jax.ShapeDtypeStruct((batch, kv_heads, n_items, block_k, head_dim), jnp.float32)
  dq_shape = jax.ShapeDtypeStruct(q_in.shape, jnp.float32)
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, block_q=block_q, block_k=block_k, group=group,
                        heads_per_program=hp, num_kv_blocks=kv_len // block_k,
                        dq_atomic=dq_atomic),
      grid=(n_items, batch, kv_heads),
      in_specs=[
          q_all, kv_all, kv_all,
          pl.BlockSpec((None, q_len, None, topk), lambda i, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, q_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, None, None, 4), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, key_index.tiles.shape[-1]), lambda i, b, h: (b, h, 0)),
          q_all, rows_all, rows_all, *([q_all] if dq_atomic else []),
      ],
      out_specs=[part, part, *([q_all] if dq_atomic else [])],
      out_shape=[part_shape, part_shape, *([dq_shape] if dq_atomic else [])],
      input_output_aliases={11: 2} if dq_atomic else {},
      compiler_params=plgpu.CompilerParams(num_warps=launch[0], num_stages=launch[1]),
      interpret=interpret, name="sparse_attention_dkdv",
  )(q_in, k, v, selected, q_segment_ids, kv_segment_ids, key_index.items, key_index.tiles, do_in,
    lse2, delta, *([jnp.zeros(dq_shape.shape, jnp.float32)] if dq_atomic else []))
