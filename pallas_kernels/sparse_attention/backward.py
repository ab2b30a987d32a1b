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

With a key bias both kernels add it to the logits they recompute, and the dk/dv kernel also sums
dS over its rows (every head of the group) per key: the bias's gradient, since dS is already the
gradient of the natural-log logits (P and the kernels' base 2 only meet inside exp2). Its
partial sums per work item are added like dK's. Without a bias no kernel takes a bias input.
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


def _probs_and_dlogits(q, k, v, do, lse2, delta, visible, scale, bias2=None):
  """Recomputed probabilities P and dS = P * (dP - delta) for one (query rows x key block) tile;
  bias2: None or the block's key bias [block_k] in base 2."""
  shifted = plgpu.dot(q, k.T) * (scale * LOG2E) - lse2[:, None]
  if bias2 is not None:
    # Added after the shift, not to the logits: the scale's multiply fuses into the subtraction
    # (an FMA on the CPU at least), and this order keeps that, so a zero bias gives the
    # unbiased P bit for bit.
    shifted = shifted + bias2[None, :]
  p = jnp.where(visible, jnp.exp2(shifted), 0.0)
  dp = plgpu.dot(do, v.T)
  return p, p * (dp - delta[:, None])


def _dq_kernel(q_ref, k_ref, v_ref, sel_ref, q_seg_ref, kv_seg_ref, union_ref, do_ref, lse_ref,
               delta_ref, *refs, scale: float, block_q: int, block_k: int,
               heads_per_program: int, biased: bool):
  bias_ref, dq_ref = refs if biased else (None, *refs)
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
    bias2 = bias_ref[keys] * LOG2E if biased else None
    _, ds = _probs_and_dlogits(q, k, v, do, lse2, delta, per_row(visible, hp), scale, bias2)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, union_ref[0], body, jnp.zeros((rows, head_dim), jnp.float32))
  dq = dq * scale
  if hp > 1:
    dq = dq.reshape(block_q, hp, head_dim)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, sel_ref, q_seg_ref, kv_seg_ref, item_ref, tiles_ref,
                 do_ref, lse_ref, delta_ref, *refs, scale: float, block_q: int, block_k: int,
                 group: int, heads_per_program: int, num_kv_blocks: int, dq_atomic: bool,
                 biased: bool):
  """One work item (`index.KeyBlockIndex`): its key block's partial dK / dV (unscaled, fp32) over
  the item's query tiles. A dead item (past the last) writes zeros that no block sums. With
  dq_atomic it also adds each tile's dS K (unscaled, fp32) into the row-major dQ accumulator;
  biased: the block's partial d(key bias), dS summed over the item's rows of every head."""
  # refs: inputs [dQ accumulator (aliased to its output)] [key bias], then outputs dK, dV [dQ]
  # [d(key bias)] parts.
  refs = list(refs)
  if dq_atomic:
    refs.pop(0)
  bias_ref = refs.pop(0) if biased else None
  dk_ref, dv_ref = refs[:2]
  dq_ref = refs[2] if dq_atomic else None
  db_ref = refs[-1] if biased else None
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
  bias2 = bias_ref[keys] * LOG2E if biased else None

  def over_query_tiles(i, carry):
    query_block = tiles_ref[first + i]
    tokens = pl.ds(query_block * block_q, block_q)
    q_pos = query_block * block_q + jnp.arange(block_q)
    visible = per_row(visible_tile(sel_ref[tokens, :], key_block, q_pos, k_pos,
                                   q_seg_ref[tokens], k_seg), hp)
    tile_rows = pl.ds(query_block * rows, rows)

    def over_head_chunks(c, carry):
      dk, dv = carry[:2]
      chunk = kv_head * chunks + c
      q = q_ref[chunk, tile_rows, :]
      do = do_ref[chunk, tile_rows, :]
      lse2 = lse_ref[chunk, tile_rows]
      delta = delta_ref[chunk, tile_rows]
      p, ds = _probs_and_dlogits(q, k, v, do, lse2, delta, visible, scale, bias2)
      dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
      dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
      if dq_atomic:
        plgpu.atomic_add(dq_ref, (chunk, tile_rows, slice(None)),
                         plgpu.dot(ds.astype(k.dtype), k))
      if biased:
        return dk, dv, carry[2] + jnp.sum(ds, axis=0)
      return dk, dv

    if chunks == 1:  # no loop of one iteration: the tile loop stays innermost (Triton pipelines it)
      return over_head_chunks(0, carry)
    return lax.fori_loop(0, chunks, over_head_chunks, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  init = (zeros, zeros) + ((jnp.zeros((block_k,), jnp.float32),) if biased else ())
  sums = lax.fori_loop(0, count, over_query_tiles, init)
  dk_ref[...] = sums[0]
  dv_ref[...] = sums[1]
  if biased:
    db_ref[...] = sums[2]


def _sum_items_kernel(block_items_ref, *refs, scale: float, biased: bool):
  """One key block: the sum of its items' partial dK / dV [/ d(key bias)], in a fixed order
  (deterministic)."""
  parts, outs = refs[:len(refs) // 2], refs[len(refs) // 2:]
  first, count = block_items_ref[0], block_items_ref[1]

  def body(j, carry):
    return tuple(total + part[first + j] for total, part in zip(carry, parts))

  dk_ref, dv_ref = outs[:2]
  zeros = jnp.zeros(dk_ref.shape, jnp.float32)
  init = (zeros, zeros) + ((jnp.zeros(outs[2].shape, jnp.float32),) if biased else ())
  sums = lax.fori_loop(0, count, body, init)
  dk_ref[...] = (sums[0] * scale).astype(dk_ref.dtype)
  dv_ref[...] = sums[1].astype(dv_ref.dtype)
  if biased:
    outs[2][...] = sums[2]


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
                              mosaic_stages: int = 4, key_bias=None):
  """Padded inputs as in `sparse_attention_forward` (with its block_q, heads_per_program and
  unions), the dk/dv kernel's index (`index.block_index` at the same block_q), the forward's lse
  [b, heads, t], delta [b, heads, t] (rowsum(dO * O) - dLSE) and the output cotangent.
  dq_launch / dkdv_launch: (num_warps, num_stages) of each kernel. dq_atomic: no dq kernel; the
  dk/dv kernel, which has dS already, adds dS K into an fp32 accumulator with atomics (one
  matmul where the dq kernel recomputes P and dS for it: two more; the sum's order, so its last
  bits, then vary from run to run). dkdv_kernel: "triton", or "mosaic" for the dK/dV partial
  sums of backward_mosaic.py (Hopper; key_index built with token_bits, one document per row,
  no dq_atomic), with `mosaic_stages` Q/dO slots. key_bias: None or float32 [b, kv_heads, s] as
  in `sparse_attention_forward` (Triton dk/dv only). Returns (dq, dk, dv) like q, k, v, and with
  a key_bias (dq, dk, dv, d_key_bias [b, kv_heads, s] float32)."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  hp = heads_per_program
  topk = selected.shape[-1]
  scale = 1.0 / math.sqrt(head_dim)
  params = lambda launch: plgpu.CompilerParams(num_warps=launch[0], num_stages=launch[1])
  biased = key_bias is not None
  if biased and dkdv_kernel != "triton":
    raise ValueError("sparse_attention_backward: key_bias needs the Triton dk/dv kernel (the "
                     "Mosaic one takes no key_bias yet)")
  bias = [key_bias.astype(jnp.float32)] if biased else []
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
  bias_all = [pl.BlockSpec((None, None, kv_len), lambda i, b, h: (b, kv_head(h), 0))] * biased
  dq = None if dq_atomic else pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k,
                        heads_per_program=hp, biased=biased),
      grid=(q_len // block_q, batch, heads // hp),
      in_specs=[
          q_tile, kv_all, kv_all,
          pl.BlockSpec((None, block_q, None, topk), lambda i, b, h: (b, i, kv_head(h), 0)),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
          pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, None, None, unions.shape[-1]),
                       lambda i, b, h: (b, kv_head(h), i, 0)),
          q_tile, row_vec, row_vec, *bias_all,
      ],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params(dq_launch), interpret=interpret, name="sparse_attention_dq",
  )(q, k, v, selected, q_segment_ids, kv_segment_ids, unions, d_out, lse2, delta, *bias)

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
                           hp=hp, dq_atomic=dq_atomic, launch=dkdv_launch, interpret=interpret,
                           bias=bias)
  outputs = list(outputs)
  dk_part, dv_part = outputs[:2]
  if dq_atomic:
    dq_rows = outputs[2]
    dq = jnp.swapaxes((dq_rows * scale).reshape(batch, heads // hp, q_len, hp, head_dim), 1, 2)
    dq = dq.reshape(q.shape).astype(q.dtype)
  db_part = outputs[-1:] if biased else []

  parts = pl.BlockSpec((None, None, n_items, block_k, head_dim), lambda j, b, h: (b, h, 0, 0, 0))
  kv_tile = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
  bias_parts = [pl.BlockSpec((None, None, n_items, block_k), lambda j, b, h: (b, h, 0, 0))]
  bias_tile = [pl.BlockSpec((None, None, block_k), lambda j, b, h: (b, h, j))]
  grads = pl.pallas_call(
      functools.partial(_sum_items_kernel, scale=scale, biased=biased),
      grid=(kv_len // block_k, batch, kv_heads),
      in_specs=[pl.BlockSpec((None, None, None, 2), lambda j, b, h: (b, h, j, 0)), parts, parts,
                *bias_parts * biased],
      out_specs=[kv_tile, kv_tile, *bias_tile * biased],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 *[jax.ShapeDtypeStruct((batch, kv_heads, kv_len), jnp.float32)] * biased],
      compiler_params=params((4, 1)), interpret=interpret, name="sparse_attention_dkdv_sum",
  )(block_items, dk_part, dv_part, *db_part)
  return (dq, *grads)


def _dkdv_triton(q_in, k, v, selected, q_segment_ids, kv_segment_ids, key_index, do_in, lse2,
                 delta, *, scale, block_q, block_k, group, hp, dq_atomic, launch, interpret,
                 bias=()):
  """The Triton dk/dv kernel over the work items: (dk_parts, dv_parts[, dq rows fp32]
  [, d(key bias) parts fp32]); bias: () or (key bias [b, kv_heads, s] float32,)."""
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
  biased = len(bias) > 0
  # After the dQ accumulator, so that its aliased input index stays 11.
  bias_all = [pl.BlockSpec((None, None, kv_len), lambda i, b, h: (b, h, 0))] * biased
  bias_part = [pl.BlockSpec((None, None, None, block_k), lambda i, b, h: (b, h, i, 0))] * biased
  bias_shape = [jax.ShapeDtypeStruct((batch, kv_heads, n_items, block_k), jnp.float32)] * biased
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, block_q=block_q, block_k=block_k, group=group,
                        heads_per_program=hp, num_kv_blocks=kv_len // block_k,
                        dq_atomic=dq_atomic, biased=biased),
      grid=(n_items, batch, kv_heads),
      in_specs=[
          q_all, kv_all, kv_all,
          pl.BlockSpec((None, q_len, None, topk), lambda i, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, q_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, None, None, 4), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, key_index.tiles.shape[-1]), lambda i, b, h: (b, h, 0)),
          q_all, rows_all, rows_all, *([q_all] if dq_atomic else []), *bias_all,
      ],
      out_specs=[part, part, *([q_all] if dq_atomic else []), *bias_part],
      out_shape=[part_shape, part_shape, *([dq_shape] if dq_atomic else []), *bias_shape],
      input_output_aliases={11: 2} if dq_atomic else {},
      compiler_params=plgpu.CompilerParams(num_warps=launch[0], num_stages=launch[1]),
      interpret=interpret, name="sparse_attention_dkdv",
  )(q_in, k, v, selected, q_segment_ids, kv_segment_ids, key_index.items, key_index.tiles, do_in,
    lse2, delta, *([jnp.zeros(dq_shape.shape, jnp.float32)] if dq_atomic else []), *bias)
