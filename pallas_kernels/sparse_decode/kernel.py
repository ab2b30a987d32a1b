"""Block-sparse flash-decoding as a Pallas kernel (Triton lowering: the same first-version
lowering as pallas_kernels/sparse_attention; Mosaic GPU is the next step).

Grid (batch, kv_head, split). A program owns one KV head of one row and the `group` query heads
that share it: they are the rows of every tile (padded to >= 16 rows, since tl.dot needs M, N, K
>= 16), so each selected block of K and V is loaded once for the whole group. The row's live
block slots [0, end) are cut into `num_splits` contiguous slices (ceil(end / num_splits) each,
computed in the kernel, so splits never idle on a row's dead slots); a program runs an online
softmax (float32, base 2) over its slice and writes a partial (out, lse). The op combines the
splits (flash-decoding).

Issuing two or four blocks' K/V loads together before their math (an option tried on the H100,
2026-12-07) left the kernel at 19.1-19.7 us (batch 8, 128k): at 8 splits it runs one 4-warp
program per SM (6% occupancy, 46% of DRAM peak in ncu), so the program count, not each
program's chain of loads, limits it (experiments/results/decode_step_1207d.md).

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

# Columns of the per-(row, KV head) index: one small int32 array per program (as in
# sparse_attention/index.py), padded to a power of two.
END, LENGTH, Q_SEGMENT = 0, 1, 2
HEADER = 4  # block indices start here


def _decode_kernel(meta_ref, q_ref, k_ref, v_ref, *refs, scale: float, block_k: int,
                   num_splits: int, capacity: int, segments: bool):
  o_ref, lse_ref = refs[-2:]  # (with poisoned outputs, the aliased input buffers come first)
  kv_seg_ref = refs[0] if segments else None
  split = pl.program_id(2)
  end, length, q_seg = meta_ref[END], meta_ref[LENGTH], meta_ref[Q_SEGMENT]
  per_split = lax.div(end + num_splits - 1, num_splits)
  lo = split * per_split
  hi = jnp.minimum(lo + per_split, end)
  q = q_ref[...]                                       # [rows, d]
  rows, head_dim = q.shape
  offsets = jnp.arange(block_k)

  def body(u, carry):
    acc, m_prev, l_prev = carry
    block = meta_ref[HEADER + u]
    first = block * block_k
    start = jnp.minimum(jnp.maximum(first, 0), capacity - block_k)
    keys = pl.ds(start, block_k)
    pos = start + offsets
    visible = (block >= 0) & (pos >= first) & (pos < first + block_k) & (pos < length)
    if segments:
      visible &= kv_seg_ref[keys] == q_seg
    logits = plgpu.dot(q, k_ref[keys, :].T) * (scale * LOG2E)      # [rows, block_k]
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
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  seen = l > 0
  safe = jnp.where(seen, l, 1.0)
  o_ref[...] = acc / safe[:, None]
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(safe)) / LOG2E, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("block_k", "num_splits", "interpret", "num_warps",
                                             "num_stages", "poison"))
def sparse_decode_partials(meta, q, k, v, kv_segment_ids, *, block_k: int, num_splits: int,
                           interpret: bool = False, num_warps: int = 4, num_stages: int = 2,
                           poison: bool = False):
  """meta [b, kv_heads, width] int32 (END, LENGTH, Q_SEGMENT columns, then block indices, -1 =
  dead); q [b, kv_heads, rows, d] (rows a power of two >= 16, padding rows zero); k, v [b,
  capacity, kv_heads, d] with capacity >= block_k; kv_segment_ids [b, capacity] int32 or None.
  Returns float32 partials (out [b, kv_heads, num_splits, rows, d], lse [b, kv_heads, num_splits,
  rows], natural log, -inf for a split that saw no key). poison=True writes into NaN-filled
  output buffers (tests: any tile the kernel fails to write stays NaN)."""
  batch, kv_heads, rows, head_dim = q.shape
  capacity = k.shape[1]
  width = meta.shape[-1]
  segments = kv_segment_ids is not None
  kernel = functools.partial(_decode_kernel, scale=1.0 / math.sqrt(head_dim), block_k=block_k,
                             num_splits=num_splits, capacity=capacity, segments=segments)
  out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, head_dim), jnp.float32),
               jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows), jnp.float32)]
  out_specs = [
      pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
      pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
  ]
  in_specs = [
      pl.BlockSpec((None, None, width), lambda b, h, s: (b, h, 0)),
      pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
      pl.BlockSpec((None, capacity, None, head_dim), lambda b, h, s: (b, 0, h, 0)),
      pl.BlockSpec((None, capacity, None, head_dim), lambda b, h, s: (b, 0, h, 0)),
  ]
  args = [meta, q, k, v]
  if segments:
    in_specs.append(pl.BlockSpec((None, capacity), lambda b, h, s: (b, 0)))
    args.append(kv_segment_ids)
  aliases = {}
  if poison:
    in_specs += out_specs
    aliases = {len(args): 0, len(args) + 1: 1}
    args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
  return pl.pallas_call(
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
