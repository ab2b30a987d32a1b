"""Block-sparse flash-decoding as a Mosaic GPU kernel (Hopper: TMA, wgmma): the Triton kernel's
semantics (pallas_kernels/sparse_decode/kernel.py) with its blocks' loads in flight together.

Grid (split, KV head, row), splits fastest. A CTA is one warpgroup: it loads the `rows` query
heads of its KV head into the first rows of a 64-row tile (wgmma's least M; the other rows are
zeros, computed and never stored), takes the same share of the row's live slots as the Triton
kernel, issues the TMA loads of the first `stages` blocks' K and V at once and refills a slot as
soon as its block is done, so up to `stages` blocks are in flight without registers holding them
(the Triton kernel's program waits on a chain of loads: 46% of DRAM peak in ncu,
experiments/results/decode_step_1207d.md). Each split writes a partial softmax as the Triton
kernel's `write_partial` lays it out; the last split of a (row, KV head) waits on a global-memory
semaphore for the others' and merges them with `extra` partials written elsewhere (the decode
step's forced-block programs) into the result (`_combine`).

Measured (H100, experiments/results/decode_mosaic_1207j.md): slower than the Triton kernel, 11.5
against 9.5 us warm and 16.2 against 15.5 cold at batch 8 over 31 blocks. The bytes in flight
were not what the Triton kernel lacked: both pay ~6 us of DRAM for the 16 MB cold, and the rest
is a fixed chain (launch, indices, partials, arrival, combine) that this kernel does not shorten.

Masking as the Triton kernel: the slot's own block (dead slots, -1, see nothing), keys below the
row's length, equal segment ids when given (each block's ids come with its K and V by TMA), and a
cache whose capacity is not a multiple of the block has its last block loaded shifted back to end
at the capacity (the re-read keys masked).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention.forward import LOG2E, MASK_VALUE

ROWS = 64  # a wgmma's M: the query tile, the real rows first


def _live_end(idx_ref, batch, head):
  """One past the row's last live slot (index >= 0), from one vector load of its slots."""
  width = idx_ref.shape[-1]
  layout = plgpu.Layout.WG_STRIDED((width,), vec_size=1)
  slots = plgpu.load(idx_ref.at[batch, head], layout=layout, optimized=False)
  position = plgpu.broadcasted_iota(jnp.int32, (width,), 0, layout=layout) + 1
  return jnp.max(jnp.where(slots >= 0, position, 0))


def _attend(idx_ref, len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, segments, end, scoped, *,
            rows: int, block_k: int, splits: int, stages: int, capacity: int, interpret: bool):
  """This split's share of the row's live slots [0, end): its partial softmax, written at part
  `split`. segments: None, or the (q_seg [b], kv_seg [b, capacity]) refs."""
  split, head, batch = (lax.axis_index(a) for a in ("splits", "heads", "batch"))
  ((q_smem, k_smem, v_smem, o_smem, lse_smem, p_smem, seg_smem),
   (q_ready, k_ready, v_ready, seg_ready)) = scoped
  head_dim = q_smem.shape[-1]
  length = len_ref[batch]

  per_split = lax.div(end + splits - 1, splits)
  lo = jnp.minimum(split * per_split, end)
  hi = jnp.minimum(lo + per_split, end)

  def block_start(block):
    return jnp.minimum(jnp.maximum(block * block_k, 0), capacity - block_k)

  def load(u, slot):
    keys = pl.ds(block_start(idx_ref[batch, head, u]), block_k)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, head], k_smem.at[slot], k_ready.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, head], v_smem.at[slot], v_ready.at[slot])
    if segments is not None:
      plgpu.copy_gmem_to_smem(segments[1].at[batch, keys], seg_smem.at[slot], seg_ready.at[slot])

  for s in range(stages):
    pl.when(lo + s < hi)(functools.partial(load, lo + s, s))

  # The padding rows are zeros (written before the TMA fills the real rows).
  layout = plgpu.Layout.WGMMA
  q_smem[...] = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), q_smem.dtype), layout)
  plgpu.commit_smem()
  plgpu.copy_gmem_to_smem(q_ref.at[batch, head], q_smem.at[pl.ds(0, rows)], q_ready)
  plgpu.barrier_wait(q_ready)

  col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), 1, layout=layout)
  q_seg = None if segments is None else segments[0][batch]
  scale2 = LOG2E / math.sqrt(head_dim)

  def product(a, b, shape):
    def run(acc):
      plgpu.wgmma(acc, a, b)
      return acc[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

  def body(u, carry):
    acc, m, l = carry
    slot = lax.rem(u - lo, stages)
    block = idx_ref[batch, head, u]
    first = block * block_k
    pos = block_start(block) + col
    visible = (block >= 0) & (pos >= first) & (pos < first + block_k) & (pos < length)
    if segments is not None:  # the keys of the query's segment, each broadcast along its column
      plgpu.barrier_wait(seg_ready.at[slot])
      key_seg = plgpu.load(seg_smem.at[slot], layout=layout.reduce(0))
      visible &= lax.broadcast_in_dim(key_seg == q_seg, visible.shape, [1])
    plgpu.barrier_wait(k_ready.at[slot])
    s = product(q_smem, k_smem.at[slot].transpose((1, 0)), (ROWS, block_k))
    s = jnp.where(visible, s * scale2, MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_next)
    # where(): a block whose keys are all masked so far adds nothing (exp2(0) would add 1s).
    p = jnp.where(visible, jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0])), 0.0)
    l_next = l * alpha + p.sum(axis=1)
    plgpu.barrier_wait(v_ready.at[slot])
    p = p.astype(v_smem.dtype)
    if interpret:  # interpret mode's wgmma takes operands from memory only
      p_smem[...] = p
      plgpu.commit_smem()
      p = p_smem
    pv = product(p, v_smem.at[slot], (ROWS, head_dim))
    # Both products have been waited for: the slot is free for the block `stages` ahead.
    pl.when(u + stages < hi)(functools.partial(load, u + stages, slot))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
    return acc, m_next, l_next

  reduced = layout.reduce(1)
  acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), layout)
  m = plgpu.layout_cast(jnp.full((ROWS,), MASK_VALUE, jnp.float32), reduced)
  l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), reduced)
  acc, m, l = lax.fori_loop(lo, hi, body, (acc, m, l))

  seen = l > 0
  safe = jnp.where(seen, l, 1.0)
  o_smem[...] = acc * lax.broadcast_in_dim(1.0 / safe, acc.shape, [0])
  lse_smem[...] = jnp.where(seen, (m + jnp.log2(safe)) / LOG2E, -jnp.inf)
  plgpu.commit_smem()
  part = pl.ds(split * rows, rows)
  plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows)], o_ref.at[batch, head, part])
  plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, rows)], lse_ref.at[batch, head, part])
  plgpu.wait_smem_to_gmem(0)


def _combine(sources, out_ref, lse_out_ref, scoped, *, rows: int):
  """Flash-decoding's combine of a (row, KV head)'s partials, read from global memory: sources
  are (out [b, kv_heads, n * rows, d], lse [b, kv_heads, n * rows], n) refs. A 64-row tile of a
  source holds tiles = 64 / rows consecutive parts, so each warp's rows merge parts p, p + tiles,
  ... of one head (an online logsumexp merge, in registers); the `tiles` row groups are then
  merged through shared memory: each row reads its partner rows' lse and rescaled outputs from a
  doubled copy (rows r + rows * j mod 64, j < tiles: the same head), so every row group ends
  with its head's result and the first `rows` rows are stored."""
  head, batch = lax.axis_index("heads"), lax.axis_index("batch")
  lse2_smem, o2_smem, out_smem, lse_smem = scoped
  layout = plgpu.Layout.WGMMA
  reduced = layout.reduce(1)
  head_dim = o2_smem.shape[-1]
  tiles = ROWS // rows
  broadcast = lambda x: lax.broadcast_in_dim(x, (ROWS, head_dim), [0])

  m = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), reduced)
  l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), reduced)
  acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), layout)
  for o_ref, lse_ref, parts in sources:
    for t in range(parts // tiles):
      window = pl.ds(t * ROWS, ROWS)
      lse = plgpu.load(lse_ref.at[batch, head, window], layout=reduced, optimized=False)
      o = plgpu.load(o_ref.at[batch, head, window], layout=layout, optimized=False)
      m_next = jnp.maximum(m, lse)
      base = jnp.where(jnp.isneginf(m_next), 0.0, m_next)
      alpha, weight = jnp.exp(m - base), jnp.exp(lse - base)
      acc = acc * broadcast(alpha) + o * broadcast(weight)
      l, m = l * alpha + weight, m_next
  seen = l > 0
  safe = jnp.where(seen, l, 1.0)
  lse = jnp.where(seen, jnp.log(safe) + jnp.where(seen, m, 0.0), -jnp.inf)
  out = acc * broadcast(1.0 / safe)
  if tiles > 1:
    # Row r's partner rows r + rows, r + 2 rows, ... (mod 64) hold the same head.
    lse2_smem.at[pl.ds(0, ROWS)][...] = lse
    lse2_smem.at[pl.ds(ROWS, ROWS)][...] = lse
    plgpu.commit_smem()
    others = [plgpu.load(lse2_smem.at[pl.ds(rows * j, ROWS)], layout=reduced)
              for j in range(tiles)]
    top = functools.reduce(jnp.maximum, others)
    base = jnp.where(jnp.isneginf(top), 0.0, top)
    total = sum(jnp.exp(x - base) for x in others)
    merged = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + base, -jnp.inf)
    scaled = out * broadcast(jnp.where(jnp.isneginf(lse), 0.0,
                                       jnp.exp(lse - jnp.where(jnp.isneginf(merged), 0.0,
                                                               merged))))
    o2_smem.at[pl.ds(0, ROWS)][...] = scaled
    o2_smem.at[pl.ds(ROWS, ROWS)][...] = scaled
    plgpu.commit_smem()
    out = functools.reduce(jnp.add, [plgpu.load(o2_smem.at[pl.ds(rows * j, ROWS)], layout=layout)
                                     for j in range(tiles)])
    lse = merged
  out_smem[...] = out.astype(out_smem.dtype)
  lse_smem[...] = lse
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, rows)], out_ref.at[batch, head])
  plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, rows)], lse_out_ref.at[batch, head])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("block_k", "num_splits", "stages", "interpret"))
def sparse_decode_mosaic(idx, lengths, q, k, v, extra=None, q_segment_ids=None,
                         kv_segment_ids=None, *, block_k: int, num_splits: int, stages: int = 4,
                         interpret: bool = False):
  """idx [b, kv_heads, width] int32 (-1 dead; width a multiple of 128); lengths [b] int32; q [b,
  kv_heads, rows, d] (rows 16, 32 or 64, padding rows zero); k, v [b, capacity, kv_heads, d]
  bf16/f16 with capacity >= block_k; extra: None or (out float32 [b, kv_heads, parts * rows,
  d], lse [b, kv_heads, parts * rows]) partials computed elsewhere (`kernel.write_partial`'s
  layout), merged in too; q_segment_ids [b] with kv_segment_ids [b, capacity] int32, or
  neither: keys of other segments are masked. num_splits and the extra parts must be multiples
  of 64 / rows (a 64-row tile of partials holds that many). Returns (out [b, kv_heads, rows, d]
  in q.dtype, lse [b, kv_heads, rows] float32 natural log, -inf for a row that saw nothing)."""
  batch, kv_heads, rows, head_dim = q.shape
  capacity = k.shape[1]
  fn = "sparse_decode_mosaic"
  if rows not in (16, 32, 64) or head_dim % 64 or block_k % 64:
    raise ValueError(f"{fn}: rows must be 16, 32 or 64 and head_dim, block_k multiples of 64; "
                     f"got rows={rows}, head_dim={head_dim}, block_k={block_k}")
  if capacity % 8 or capacity < block_k:
    # (The TMA start of a cache's shifted last block must be a multiple of the 8-row tiling.)
    raise ValueError(f"{fn}: the cache capacity must be a multiple of 8 and >= block_k, got "
                     f"{capacity}")
  if idx.shape[-1] % 128:
    raise ValueError(f"{fn}: the slot width must be a multiple of 128 (one vector load per "
                     f"warpgroup), got {idx.shape[-1]}")
  tiles = ROWS // rows
  extra_parts = 0 if extra is None else extra[1].shape[-1] // rows
  if num_splits % tiles or extra_parts % tiles:
    raise ValueError(f"{fn}: num_splits ({num_splits}) and the extra parts ({extra_parts}) must "
                     f"be multiples of {tiles} (64 / rows)")
  segmented = kv_segment_ids is not None
  if (q_segment_ids is None) == segmented:
    raise ValueError(f"{fn}: pass both q_segment_ids and kv_segment_ids, or neither")
  dtype = q.dtype
  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  attend_smem = (
      (plgpu.SMEM((ROWS, head_dim), dtype, **tiled),
       plgpu.SMEM((stages, block_k, head_dim), dtype, **tiled),
       plgpu.SMEM((stages, block_k, head_dim), dtype, **tiled),
       plgpu.SMEM((ROWS, head_dim), jnp.float32),
       plgpu.SMEM((ROWS,), jnp.float32),
       plgpu.SMEM((ROWS, block_k), dtype, **tiled) if interpret else None,
       plgpu.SMEM((stages, block_k), jnp.int32) if segmented else None),
      (plgpu.Barrier(), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
       plgpu.Barrier(num_barriers=stages) if segmented else None))
  combine_smem = (plgpu.SMEM((2 * ROWS,), jnp.float32),
                  plgpu.SMEM((2 * ROWS, head_dim), jnp.float32),
                  plgpu.SMEM((ROWS, head_dim), dtype),
                  plgpu.SMEM((ROWS,), jnp.float32))

  # The body's name names the kernel in profiles (sparse_decode_mosaic_gpu...).
  def sparse_decode(idx_ref, len_ref, q_ref, k_ref, v_ref, *refs):
    refs = list(refs)
    segments = (refs.pop(0), refs.pop(0)) if segmented else None
    extra_refs = (refs.pop(0), refs.pop(0)) if extra is not None else ()
    o_part, lse_part, out_ref, lse_ref = refs
    split, head, batch_ = (lax.axis_index(a) for a in ("splits", "heads", "batch"))
    # Before the scoped allocations: Pallas notes that the strided reduction's shared-memory
    # scratch is not synchronised with run_scoped's (jax 0.11.2, mosaic_gpu/lowering.py).
    end = _live_end(idx_ref, batch_, head)
    pl.run_scoped(
        lambda *scoped: _attend(idx_ref, len_ref, q_ref, k_ref, v_ref, o_part, lse_part,
                                segments, end, scoped,
                                rows=rows, block_k=block_k, splits=num_splits, stages=stages,
                                capacity=capacity, interpret=interpret),
        *attend_smem)
    # The last split of a (row, KV head) merges the partials once the others have written
    # theirs. It is the last of them launched (splits are the grid's first axis, blockIdx.x, and
    # blocks start in index order), so its wait never holds a slot that an unstarted split
    # needs. Interpret mode runs the programs one after another.
    last = split == num_splits - 1
    if not interpret:  # (interpret mode has no global semaphores)
      # One semaphore per (row, KV head), shared by the whole grid (a scratch semaphore would be
      # each CTA's own); every call's wait takes it back to zero.
      arrivals = pl.get_global(plgpu.SemaphoreType.REGULAR((batch * kv_heads,)))
      arrival = arrivals.at[batch_ * kv_heads + head]

      @pl.when(jnp.logical_not(last))
      def _signal():
        plgpu.semaphore_signal(arrival, 1, memory_scope="gpu")

    @pl.when(last)
    def _merge():
      if not interpret:
        plgpu.semaphore_wait(arrival, num_splits - 1, memory_scope="gpu")
      sources = [(o_part, lse_part, num_splits)]
      if extra is not None:
        sources.append((*extra_refs, extra_parts))
      pl.run_scoped(lambda *scoped: _combine(sources, out_ref, lse_ref, scoped, rows=rows),
                    *combine_smem)

  params = dict(interpret=plgpu.InterpretGPUParams()) if interpret else {}
  parts = num_splits * rows
  _, _, out, lse = plgpu.kernel(
      sparse_decode,
      out_type=(jax.ShapeDtypeStruct((batch, kv_heads, parts, head_dim), jnp.float32),
                jax.ShapeDtypeStruct((batch, kv_heads, parts), jnp.float32),
                jax.ShapeDtypeStruct((batch, kv_heads, rows, head_dim), dtype),
                jax.ShapeDtypeStruct((batch, kv_heads, rows), jnp.float32)),
      grid=(num_splits, kv_heads, batch),
      grid_names=("splits", "heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **params,
  )(idx, lengths, q, k, v, *((q_segment_ids, kv_segment_ids) if segmented else ()),
    *(() if extra is None else extra))
  return out, lse
