"""Block-sparse flash attention, forward, as a Mosaic GPU kernel (Hopper: TMA, wgmma, warp
specialisation), the layout of FlashAttention-3 over the blocks a tile selected.

One CTA = one head group (`heads_per_program` = hp query heads of one KV head) x 2 x wt query
tokens, wt = 64 / hp, in three warpgroups:
  - two compute warpgroups, each owning 64 rows: the (token, head) pairs of its wt tokens,
    token-major, as the Triton kernels' tiles. Q sits in shared memory; each key block costs two
    wgmma (Q K^T, P V) and an online softmax in registers;
  - one memory warpgroup that streams the K and V blocks of the CTA's union through `stages`
    shared-memory slots with TMA, ahead of the compute warpgroups.
Both compute warpgroups see every block of the CTA's union (they share its K/V loads); a block
none of a warpgroup's tokens selected costs that warpgroup only the barrier waits. Rows are masked
by their token's bit in `index.union_token_bits` (one int32 word per block per 32 tokens), by
causality and, for packed documents, by their document's first position (`row_starts`): a
document is a run of equal segment ids, which is the reference's equal-ids rule when no id
comes back after another (the op checks that). An optional per-key bias (NOSA's eviction
scores) is read one block ahead from global memory and added to the scaled logits.

Shapes it takes: hp in {1, 8, 16, 32, 64} (Q and O move as hp x head_dim tiles per token, which
the TMA's 8-row shared-memory tiling needs, or as one 64-token tile of one head), head_dim a
multiple of 64, block_k a multiple of 64, bf16 or f16. Outputs as the Triton forward: out in q's
layout and dtype, lse [b, heads, t] float32, natural log; a row that saw no key gets zeros, -inf.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention.forward import LOG2E, MASK_VALUE

ROWS = 64                 # rows of one wgmma: a compute warpgroup's tile
COMPUTE_WARPGROUPS = 2
HEADS_PER_PROGRAM = (1, 8, 16, 32, 64)


def check_shapes(q, k, heads_per_program: int, block_k: int):
  """Raises ValueError naming what the Mosaic GPU forward cannot take."""
  head_dim = q.shape[-1]
  if heads_per_program not in HEADS_PER_PROGRAM:
    raise ValueError(f"sparse_attention (mosaic forward): heads_per_program must be one of "
                     f"{HEADS_PER_PROGRAM}, got {heads_per_program}")
  if head_dim % 64:
    raise ValueError(f"sparse_attention (mosaic forward): head_dim must be a multiple of 64, "
                     f"got {head_dim}")
  if block_k % 64:
    raise ValueError(f"sparse_attention (mosaic forward): block_size must be a multiple of 64, "
                     f"got {block_k}")
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    raise ValueError(f"sparse_attention (mosaic forward): q, k, v must all be bfloat16 or "
                     f"float16, got {q.dtype} and {k.dtype}")


def tile_tokens(heads_per_program: int) -> int:
  """Query tokens per CTA: two compute warpgroups of 64 / hp tokens."""
  return COMPUTE_WARPGROUPS * ROWS // heads_per_program


def fill_slots(count, stages: int, load, drain):
  """A memory warpgroup's loop: load(u, slot, wait_free) for u < count through `stages` slots
  (the first `stages` loads wait for no release), then drain(slot) for each of the last
  `stages` releases, so that every barrier phase is waited for once."""
  for u in range(stages):
    pl.when(u < count)(functools.partial(load, u, u, False))

  @pl.loop(stages, jnp.maximum(count, stages))
  def _(u):
    load(u, lax.rem(u, stages), True)

  @pl.loop(jnp.maximum(count - stages, 0), count)
  def _(u):
    drain(lax.rem(u, stages))


def _kernel(q_ref, k_ref, v_ref, union_ref, bits_ref, start_ref, bias_ref, o_ref, lse_ref, scoped,
            *, hp: int, group: int, block_k: int, stages: int):
  batch, head_group, tile = (lax.axis_index(a) for a in ("batch", "heads", "tiles"))
  wg = lax.axis_index("wg")
  kv_head = lax.div(head_group * hp, group)
  (q_smem, k_smem, v_smem, lse_smem, p_smem), (k_ready, v_ready, q_ready), (k_free, v_free) = scoped
  wt = ROWS // hp
  head_dim = q_smem.shape[-1]
  count = union_ref[batch, kv_head, tile, 0]

  @pl.when(wg < COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    first_token = tile * (COMPUTE_WARPGROUPS * wt) + wg * wt
    tile_rows = q_smem.at[wg]
    if hp == 1:
      plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first_token, wt), head_group], tile_rows,
                              q_ready.at[wg])
    else:
      for i in range(wt):
        plgpu.copy_gmem_to_smem(q_ref.at[batch, first_token + i, pl.ds(head_group * hp, hp)],
                                tile_rows.at[pl.ds(i * hp, hp)], q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])

    layout = plgpu.Layout.WGMMA
    row = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), 0, layout=layout)
    col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), 1, layout=layout)
    token = lax.shift_right_logical(row, hp.bit_length() - 1)     # row // hp: its token in wt
    q_pos = first_token + token
    bit = (wg * wt + token) % 32                                   # its bit in the tile's words
    low_word = token < 32                                          # hp == 1: words 2 wg, 2 wg + 1
    word_base = (wg * wt) // 32
    reduced = plgpu.Layout.WGMMA.reduce(1)
    if start_ref is not None:   # each row's document start, broadcast along its keys
      # Once per tile, from global memory (unvectorised: only shared memory has the fast path).
      starts = plgpu.load(start_ref.at[batch, pl.ds(first_token * hp, ROWS)], layout=reduced,
                          optimized=False)
      doc_start = lax.broadcast_in_dim(starts, (ROWS, block_k), [0])

    scale = 1.0 / math.sqrt(head_dim)

    def product(a, b, shape):
      """a @ b on the tensor cores (wgmma into a fresh accumulator), waited for."""
      def run(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]
      return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

    width = union_ref.shape[-1]

    def index_entry(u):
      """Slot u's block, this warpgroup's words of token bits (past the count: zeros) and, with
      a key bias, the block's biases in base 2 along the tile's columns."""
      column = jnp.minimum(1 + u, width - 1)
      words = [bits_ref[batch, kv_head, tile, word_base + j, column]
               for j in range(max(1, wt // 32))]
      block = union_ref[batch, kv_head, tile, column]
      if bias_ref is None:
        return block, words, None
      # From global memory (L2), one block ahead like the rest of the entry.
      keys = bias_ref.at[batch, kv_head, pl.ds(jnp.maximum(block, 0) * block_k, block_k)]
      bias = plgpu.load(keys, layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
      return block, words, bias * LOG2E

    def body(u, carry):
      acc, m, l, (block, words, bias2) = carry
      # The next slot's entry is read now, so that its global-memory latency hides behind this
      # block's work rather than stalling the next iteration's start.
      upcoming = index_entry(u + 1)
      slot = lax.rem(u, stages)
      if wt < 32:
        mine = lax.shift_right_logical(words[0], (wg * wt) % 32) & ((1 << wt) - 1)
        word_of_row = words[0]
      elif wt == 32:
        mine = word_of_row = words[0]
      else:
        mine = words[0] | words[1]
        word_of_row = jnp.where(low_word, words[0], words[1])
      plgpu.barrier_wait(k_ready.at[slot])

      def visit(acc, m, l):
        s = product(tile_rows, k_smem.at[slot].transpose((1, 0)), (ROWS, block_k))
        plgpu.barrier_arrive(k_free.at[slot])
        picked = (lax.shift_right_logical(word_of_row, bit) & 1) == 1
        key_pos = block * block_k + col
        visible = picked & (key_pos <= q_pos)
        if start_ref is not None:
          visible &= key_pos >= doc_start
        s = s * (scale * LOG2E)
        if bias_ref is not None:
          s = s + lax.broadcast_in_dim(bias2, s.shape, [1])
        s = jnp.where(visible, s, MASK_VALUE)
        m_next = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_next)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
        l_next = l * alpha + p.sum(axis=1)
        plgpu.barrier_wait(v_ready.at[slot])
        # P V into a fresh accumulator, then one FMA per element: the rescale of the running
        # output costs what multiplying it in place would.
        p = p.astype(v_smem.dtype)
        if p_smem is not None:  # interpret mode's wgmma takes operands from memory only
          p_smem.at[wg][...] = p
          plgpu.commit_smem()
          p = p_smem.at[wg]
        pv = product(p, v_smem.at[slot], (ROWS, head_dim))
        plgpu.barrier_arrive(v_free.at[slot])
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
        return acc, m_next, l_next

      def skip(acc, m, l):
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m, l

      return (*lax.cond(mine != 0, visit, skip, acc, m, l), upcoming)

    acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), layout)
    m = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), reduced)
    l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), reduced)
    acc, m, l, _ = lax.fori_loop(0, count, body, (acc, m, l, index_entry(0)))
    # A row that saw no key keeps m at MASK_VALUE (or -inf): zeros and lse -inf, as the reference.
    seen = m > MASK_VALUE
    safe_l = jnp.where(seen, l, 1.0)
    out = acc * lax.broadcast_in_dim(jnp.where(seen, 1.0 / safe_l, 0.0), acc.shape, [0])
    tile_rows[...] = out.astype(tile_rows.dtype)
    lse_smem.at[wg][...] = jnp.where(seen, (m + jnp.log2(safe_l)) / LOG2E, -jnp.inf)
    plgpu.commit_smem()
    if hp == 1:
      plgpu.copy_smem_to_gmem(tile_rows, o_ref.at[batch, pl.ds(first_token, wt), head_group])
    else:
      for i in range(wt):
        plgpu.copy_smem_to_gmem(tile_rows.at[pl.ds(i * hp, hp)],
                                o_ref.at[batch, first_token + i, pl.ds(head_group * hp, hp)])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg],
                            lse_ref.at[batch, head_group, pl.ds(first_token * hp, ROWS)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WARPGROUPS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def load(u, slot, wait_free):
      keys = pl.ds(union_ref[batch, kv_head, tile, 1 + u] * block_k, block_k)
      if wait_free:
        plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem.at[slot], k_ready.at[slot])
      if wait_free:
        plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem.at[slot], v_ready.at[slot])

    def drain(slot):
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])

    fill_slots(count, stages, load, drain)


def document_starts(segment_ids):
  """(starts [b, t] int32, runs_are_documents [b] bool): each token's first position of its run
  of equal segment ids, and whether every id forms one run (then runs are the reference's
  documents: equal ids see each other)."""
  position = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  new_run = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  starts = lax.cummax(jnp.where(new_run, position, 0), axis=1)
  ids = jnp.sort(segment_ids, axis=1)
  distinct = 1 + jnp.sum(ids[:, 1:] != ids[:, :-1], axis=1)
  return starts, jnp.sum(new_run, axis=1) == distinct


def row_starts(starts, heads_per_program: int):
  """[b, t] document starts -> [b, t * hp]: per tile row, the (token, head) pairs token-major."""
  return jnp.repeat(starts, heads_per_program, axis=1)


@functools.partial(jax.jit, static_argnames=("block_k", "heads_per_program", "stages",
                                             "interpret"))
def sparse_attention_forward_mosaic(q, k, v, unions, bits, row_starts=None, key_bias=None, *,
                                    block_k: int, heads_per_program: int, stages: int = 4,
                                    interpret: bool = False):
  """q [b, t, heads, d] with t a multiple of tile_tokens(hp); k, v [b, s, kv_heads, d] with s a
  multiple of block_k; (unions, bits) from index.union_token_bits at tile_tokens(hp) tokens;
  row_starts [b, t * hp] int32 (`row_starts`) for packed documents, None for one per row;
  key_bias None or float32 [b, kv_heads, s] (NOSA's eviction scores, natural log), added to the
  scaled logits. Returns (out [b, t, heads, d], lse [b, heads, t] float32)."""
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  hp = heads_per_program
  check_shapes(q, k, hp, block_k)
  tokens = tile_tokens(hp)
  if q_len % tokens:
    raise ValueError(f"sparse_attention_forward_mosaic: q_len={q_len} must be a multiple of "
                     f"{tokens} tokens")
  group = heads // kv_heads
  if group % hp:
    raise ValueError(f"sparse_attention_forward_mosaic: heads_per_program={hp} must divide the "
                     f"group of {group} query heads per KV head")
  dtype = q.dtype
  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))

  def entry(q_ref, k_ref, v_ref, union_ref, bits_ref, *refs):
    extra = list(refs[:-2])
    start_ref = extra.pop(0) if row_starts is not None else None
    bias_ref = extra.pop(0) if key_bias is not None else None
    o_ref, lse_ref = refs[-2:]
    pl.run_scoped(
        lambda *scoped: _kernel(q_ref, k_ref, v_ref, union_ref, bits_ref, start_ref, bias_ref,
                                o_ref, lse_ref, scoped,
                                hp=hp, group=group, block_k=block_k, stages=stages),
        (plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS, head_dim), dtype, **tiled),
         plgpu.SMEM((stages, block_k, head_dim), dtype, **tiled),
         plgpu.SMEM((stages, block_k, head_dim), dtype, **tiled),
         plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS), jnp.float32),
         plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS, block_k), dtype, **tiled) if interpret else None),
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_arrivals=1 if hp == 1 else ROWS // hp,
                       num_barriers=COMPUTE_WARPGROUPS)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
        collective_axes="wg",
    )

  params = dict(interpret=plgpu.InterpretGPUParams()) if interpret else {}
  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, heads // hp, q_len * hp), jnp.float32)),
      # Head groups vary fastest: the CTAs running at once are the heads of a few tiles, which
      # share their KV heads' blocks through L2 (with hp = 1, 16 heads per KV head read the same
      # blocks), where tiles-fastest would stream each head's K/V from HBM anew.
      grid=(heads // hp, q_len // tokens, batch),
      grid_names=("heads", "tiles", "batch"),
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **params,
  )(q, k, v, unions, bits, *([] if row_starts is None else [row_starts]),
    *([] if key_bias is None else [key_bias.astype(jnp.float32)]))
  # lse rows are (token, head) pairs per head group: [b, groups, t, hp] -> [b, heads, t].
  lse = lse.reshape(batch, heads // hp, q_len, hp).transpose(0, 1, 3, 2)
  return out, lse.reshape(batch, heads, q_len)
