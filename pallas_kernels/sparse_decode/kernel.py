"""Block-sparse flash-decoding as a Pallas kernel (Triton lowering: the same first-version
lowering as pallas_kernels/sparse_attention; Mosaic GPU is the next step).

Grid (batch, kv_head, split). A program owns one KV head of one row and the `group` query heads
that share it: they are the rows of every tile (padded to >= 16 rows, since tl.dot needs M, N, K
>= 16), so each selected block of K and V is loaded once for the whole group. The row's live
block slots [0, end) are cut into `num_splits` contiguous slices (ceil(end / num_splits) each,
computed in the kernel, so splits never idle on a row's dead slots); a program runs an online
softmax (float32, base 2) over its slice and writes a partial (out, lse). The split of a (row, KV
head) that finishes last, found by an atomic counter, merges the partials into the result
(flash-decoding's combine without a second kernel: the XLA combine cost two or three launches a
step, which grew with the splits).

At 8 splits (batch 8, 2 KV heads: one 4-warp program per SM, 6% occupancy, 46% of DRAM peak
in ncu) the program's chain of loads sets the time: three software-pipelining stages took the
kernel from 21.0 to 17.0 us on the H100 (batch 8, 128k; experiments/results/
decode_sweep_1207e.md), where issuing two or four blocks' loads together before their math,
or 8 warps, changed nothing (decode_step_1207d.md).

Keys are masked to: the slot's own block (dead slots, index -1, see nothing), the row's filled
length (keys < length: the token's own causal limit and unwritten slots), and equal segment ids
when given. A cache whose capacity is not a multiple of the block is never read past its end:
the last block's load is shifted back to end at the capacity and the keys it re-reads from the
previous block are masked out.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention.forward import LOG2E, MASK_VALUE


def attend_blocks(q, k_ref, v_ref, block_of, lo, hi, *, length, scale: float, block_k: int,
                  capacity: int, kv_seg_ref=None, q_seg=None, bias_ref=None):
  """An online softmax (float32, base 2) of q [rows, d] over slots [lo, hi), slot u holding
  block block_of(u) (negative: dead, sees nothing) of the cache k_ref / v_ref [capacity, d]:
  (acc [rows, d], m [rows], l [rows]). Keys are masked to the slot's own block, to positions <
  length and, with kv_seg_ref, to segment q_seg; the last block of a cache whose capacity is not
  a multiple of block_k is loaded shifted back to end at the capacity. bias_ref [capacity]
  float32 (NOSA's eviction scores, natural log) is added to every row's scaled logits."""
  rows, head_dim = q.shape
  offsets = jnp.arange(block_k)

  def body(u, carry):
    acc, m_prev, l_prev = carry
    block = block_of(u)
    first = block * block_k
    start = jnp.minimum(jnp.maximum(first, 0), capacity - block_k)
    keys = pl.ds(start, block_k)
    pos = start + offsets
    visible = (block >= 0) & (pos >= first) & (pos < first + block_k) & (pos < length)
    if kv_seg_ref is not None:
      visible &= kv_seg_ref[keys] == q_seg
    logits = plgpu.dot(q, k_ref[keys, :].T) * (scale * LOG2E)      # [rows, block_k]
    if bias_ref is not None:
      logits = logits + (bias_ref[keys] * LOG2E)[None, :]
    logits = jnp.where(visible[None, :], logits, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    # where(): a slice whose keys are all masked so far adds nothing (exp2(0) would add 1s).
    p = jnp.where(visible[None, :], jnp.exp2(logits - m_next[:, None]), 0.0)
    l_next = l_prev * correction + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  return lax.fori_loop(lo, hi, body, init)


def write_partial(o_part_ref, lse_part_ref, part: int, acc, m, l):
  """Stores one partial softmax as the combine reads it: rows [part * rows, (part + 1) * rows)
  of o_part_ref [parts * rows, d] (normalised out) and lse_part_ref [parts * rows] (natural
  log, -inf for a row that saw nothing)."""
  rows = acc.shape[0]
  seen = l > 0
  safe = jnp.where(seen, l, 1.0)
  o_part_ref[pl.ds(part * rows, rows), :] = acc / safe[:, None]
  lse_part_ref[pl.ds(part * rows, rows)] = jnp.where(seen, (m + jnp.log2(safe)) / LOG2E,
                                                     -jnp.inf)


def last_to_arrive(count_ref, row, programs: int, *, interpret: bool):
  """True in the one program of `programs` sharing row `row` of the (aliased, zeroed) arrival
  counter that finishes last, after every program's stores to global memory. Every thread's
  stores come before the CTA barrier, and the counter's atomic add is acquire-release at GPU
  scope; the last program must read the others' results with volatile loads (from L2, never a
  stale L1 line; Pallas' cache_modifier=".cg" does not lower in jax 0.11.2: a KeyError in its
  lookup). Interpret mode runs programs one after another and needs no barrier."""
  if not interpret:
    plgpu.debug_barrier()
  return plgpu.atomic_add(count_ref, row, jnp.ones((), jnp.int32)) == programs - 1


def _decode_kernel(idx_ref, lengths_ref, q_ref, k_ref, v_ref, *refs, scale: float, block_k: int,
                   num_splits: int, capacity: int, segments: bool, extra_parts: int,
                   biased: bool, interpret: bool):
  # The outputs come last: the splits' partials, the result, and the (aliased) arrival counter.
  o_part_ref, lse_part_ref, o_ref, lse_ref, count_ref = refs[-5:]
  refs = refs[:-5]
  q_seg_ref = kv_seg_ref = None
  if segments:
    q_seg_ref, kv_seg_ref = refs[:2]
    refs = refs[2:]
  extra = refs[:2] if extra_parts else None
  bias_ref = refs[2 if extra_parts else 0] if biased else None
  b, split = pl.program_id(0), pl.program_id(2)
  row = b * pl.num_programs(1) + pl.program_id(1)
  # One past the last live slot: the splits share the live slots, never a dead tail.
  slots = idx_ref[...]
  end = jnp.max(jnp.where(slots >= 0, jnp.arange(1, slots.shape[0] + 1), 0))
  per_split = lax.div(end + num_splits - 1, num_splits)
  lo = split * per_split
  hi = jnp.minimum(lo + per_split, end)
  acc, m, l = attend_blocks(q_ref[...], k_ref, v_ref, lambda u: idx_ref[u], lo, hi,
                            length=lengths_ref[b], scale=scale, block_k=block_k,
                            capacity=capacity, kv_seg_ref=kv_seg_ref,
                            q_seg=q_seg_ref[b] if segments else None, bias_ref=bias_ref)
  write_partial(o_part_ref, lse_part_ref, split, acc, m, l)
  # Flash-decoding's combine, by the split that finishes last.
  @pl.when(last_to_arrive(count_ref, row, num_splits, interpret=interpret))
  def _combine():
    _combine_splits(o_part_ref, lse_part_ref, o_ref, lse_ref, num_splits=num_splits,
                    rows=acc.shape[0], extra=extra, extra_parts=extra_parts)


def _combine_splits(o_part_ref, lse_part_ref, o_ref, lse_ref, *, num_splits: int, rows: int,
                    extra=None, extra_parts: int = 0):
  """Merges the splits' partial softmaxes (out [splits * rows, d], natural-log lse [splits *
  rows], split-major), and `extra_parts` more from extra = (out, lse) refs laid out alike and
  written by an earlier kernel, into o_ref [rows, d] and lse_ref [rows]. Unrolled over the
  parts, every load independent of the others: the combine sits on the kernel's critical path
  (the last program's tail), so it costs about one L2 round trip and a few FMAs per element. (A
  first version merged chunks of splits with one float32 [rows, 8 * rows] x [8 * rows, d] dot
  each: it added ~6 us at 8 splits and more with more splits.)"""
  part = lambda ref, s: plgpu.load(ref.at[pl.ds(s * rows, rows)], volatile=True)
  parts = [(o_part_ref, lse_part_ref, s) for s in range(num_splits)]
  if extra_parts:
    parts += [(extra[0], extra[1], s) for s in range(extra_parts)]
  lse = [part(lse_ref_s, s) for _, lse_ref_s, s in parts]
  m = functools.reduce(jnp.maximum, lse)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  acc, total = 0.0, 0.0
  for (o_ref_s, _, s), lse_s in zip(parts, lse):
    weight = jnp.where(lse_s == -jnp.inf, 0.0, jnp.exp(lse_s - m))
    total = total + weight
    acc = acc + weight[:, None] * part(o_ref_s, s)
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, jnp.log(safe) + m, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("block_k", "num_splits", "interpret", "num_warps",
                                             "num_stages", "poison"))
def sparse_decode_kernel(idx, lengths, q_segment_ids, q, k, v, kv_segment_ids, extra=None,
                         key_bias=None, *, block_k: int, num_splits: int, interpret: bool = False,
                         num_warps: int = 4, num_stages: int = 3, poison: bool = False):
  """idx [b, kv_heads, slots] int32 (the blocks to attend, -1 = dead; slots a power of two);
  lengths [b] int32 (keys [0, length) are filled); q [b, kv_heads, rows, d] (rows a power of two
  >= 16, padding rows zero); k, v [b, capacity, kv_heads, d] with capacity >= block_k;
  q_segment_ids [b] and kv_segment_ids [b, capacity] int32, or both None. Returns (out [b,
  kv_heads, rows, d] in q.dtype, lse [b, kv_heads, rows] float32, natural log, -inf for a row
  that saw no key), the splits already combined. extra: None, or partial softmaxes computed
  elsewhere over other keys of the same rows, merged in too: (out float32 [b, kv_heads, parts *
  rows, d] normalised, lse float32 [b, kv_heads, parts * rows] natural log, -inf for nothing
  seen), part-major as `write_partial` stores them. key_bias: None or float32 [b, kv_heads,
  capacity], added (natural log) to the scaled logits of the KV head's rows. poison=True writes into NaN-filled output
  buffers (tests: any tile the kernel fails to write stays NaN)."""
  batch, kv_heads, rows, head_dim = q.shape
  capacity = k.shape[1]
  slots = idx.shape[-1]
  segments = kv_segment_ids is not None
  extra_parts = 0 if extra is None else extra[1].shape[-1] // rows
  kernel = functools.partial(_decode_kernel, scale=1.0 / math.sqrt(head_dim), block_k=block_k,
                             num_splits=num_splits, capacity=capacity, segments=segments,
                             extra_parts=extra_parts, biased=key_bias is not None,
                             interpret=interpret)
  parts = num_splits * rows
  out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, parts, head_dim), jnp.float32),
               jax.ShapeDtypeStruct((batch, kv_heads, parts), jnp.float32),
               jax.ShapeDtypeStruct((batch, kv_heads, rows, head_dim), q.dtype),
               jax.ShapeDtypeStruct((batch, kv_heads, rows), jnp.float32),
               jax.ShapeDtypeStruct((batch * kv_heads,), jnp.int32)]
  # Every split of a (row, KV head) sees its whole partial and result blocks: each writes its
  # own partial; only the last to arrive reads them all and writes the result.
  out_specs = [
      pl.BlockSpec((None, None, parts, head_dim), lambda b, h, s: (b, h, 0, 0)),
      pl.BlockSpec((None, None, parts), lambda b, h, s: (b, h, 0)),
      pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
      pl.BlockSpec((None, None, rows), lambda b, h, s: (b, h, 0)),
      pl.BlockSpec((batch * kv_heads,), lambda b, h, s: (0,)),
  ]
  per_row = pl.BlockSpec((batch,), lambda b, h, s: (0,))
  in_specs = [
      pl.BlockSpec((None, None, slots), lambda b, h, s: (b, h, 0)),
      per_row,
      pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
      pl.BlockSpec((None, capacity, None, head_dim), lambda b, h, s: (b, 0, h, 0)),
      pl.BlockSpec((None, capacity, None, head_dim), lambda b, h, s: (b, 0, h, 0)),
  ]
  args = [idx, lengths, q, k, v]
  if segments:
    in_specs += [per_row, pl.BlockSpec((None, capacity), lambda b, h, s: (b, 0))]
    args += [q_segment_ids, kv_segment_ids]
  if extra is not None:
    width = extra_parts * rows
    in_specs += [pl.BlockSpec((None, None, width, head_dim), lambda b, h, s: (b, h, 0, 0)),
                 pl.BlockSpec((None, None, width), lambda b, h, s: (b, h, 0))]
    args += list(extra)
  if key_bias is not None:
    in_specs.append(pl.BlockSpec((None, None, capacity), lambda b, h, s: (b, h, 0)))
    args.append(key_bias.astype(jnp.float32))
  # The arrival counter starts at zero on every call; results optionally start as NaN.
  aliased = {4: jnp.zeros((batch * kv_heads,), jnp.int32)}
  if poison:
    aliased.update({i: jnp.full(out_shape[i].shape, jnp.nan, out_shape[i].dtype)
                    for i in (2, 3)})
  aliases = {}
  for output, init in sorted(aliased.items()):
    aliases[len(args)] = output
    in_specs.append(out_specs[output])
    args.append(init)
  _, _, out, lse, _ = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="sparse_decode",
  )(*args)
  return out, lse
