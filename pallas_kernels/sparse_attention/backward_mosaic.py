"""Block-sparse flash attention, backward: the dK/dV partial sums as a Mosaic GPU kernel (Hopper:
TMA, wgmma, warp specialisation), in the Triton dk/dv kernel's work items.

One CTA = one work item of `index.KeyBlockIndex` (a key block of 64 keys of one KV head, and up
to `chunk` of the query tiles whose unions hold it), in three warpgroups:
  - a memory warpgroup loads the block's K and V once, then streams the item's units, each one
    query tile x one chunk of hp heads: the tile's 64 rows of Q and dO (row-major copies, one
    TMA each) and their base-2 logsumexp and delta, through `stages` shared-memory slots;
  - two compute warpgroups take the units in turn (unit n goes to warpgroup n % 2, so with an
    even number of slots each warpgroup has its own) and keep their own dK, dV accumulators in
    registers, transposed as in FlashAttention-3: S^T = K Q^T, P^T = exp2(S^T - lse),
    dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (four wgmma; P^T and
    dS^T stay in registers as the A operands).
Each compute warpgroup writes its partial sums (fp32, unscaled) as one part of the item, so an
item has two parts (a dead item, past the last, writes none: nothing reads them); the Triton
sum kernel (`backward._sum_items_kernel`) adds a key block's parts in a fixed order, so dK and
dV stay deterministic.

Rows are masked as in the forward: the token's bit in the entry's word (`KeyBlockIndex.bits`)
and causality; a row that saw no key has lse +inf, so its P is 0. One document per row (packed
documents take the Triton kernel). Shapes: hp heads x 64 / hp tokens per tile with 2 <= hp <=
64 (a tile's tokens fit one word), block_k 64, head_dim a multiple of 64, bf16 or f16.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention.forward import LOG2E
from pallas_kernels.sparse_attention.forward_mosaic import fill_slots

ROWS = 64                 # query rows of one unit: a wgmma's N
BLOCK_K = 64              # keys of one work item: a wgmma's M
COMPUTE_WARPGROUPS = 2


def check_shapes(q, k, heads_per_program: int, block_k: int):
  """Raises ValueError naming what the Mosaic GPU dK/dV kernel cannot take."""
  what = "sparse_attention (mosaic dk/dv)"
  hp = heads_per_program
  if not 2 <= hp <= ROWS or hp & (hp - 1):
    raise ValueError(f"{what}: heads_per_program must be a power of two in [2, {ROWS}] (a tile's "
                     f"{ROWS} // hp tokens fit one word of token bits), got {hp}")
  if block_k != BLOCK_K:
    raise ValueError(f"{what}: block_size must be {BLOCK_K}, got {block_k}")
  if q.shape[-1] % 64:
    raise ValueError(f"{what}: head_dim must be a multiple of 64, got {q.shape[-1]}")
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    raise ValueError(f"{what}: q, k, v must all be bfloat16 or float16, got {q.dtype} and "
                     f"{k.dtype}")


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, items_ref, tiles_ref, bits_ref,
            dk_ref, dv_ref, scoped, *, hp: int, chunks: int, stages: int, num_kv_blocks: int):
  item, batch, kv_head = (lax.axis_index(a) for a in ("items", "batch", "heads"))
  wg = lax.axis_index("wg")
  ((k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, a_smem), (kv_ready, unit_ready),
   unit_free) = scoped
  head_dim = k_smem.shape[-1]
  key_block = jnp.minimum(items_ref[batch, kv_head, item, 0], num_kv_blocks - 1)
  first = items_ref[batch, kv_head, item, 1]
  units = items_ref[batch, kv_head, item, 2] * chunks
  wt = ROWS // hp                                    # tokens per tile
  # A dead item (past the last) does nothing: no key block sums its parts.
  live = units > 0

  @pl.when(live & (wg < COMPUTE_WARPGROUPS))
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    layout = plgpu.Layout.WGMMA
    by_column = layout.reduce(0)
    scale2 = LOG2E / math.sqrt(head_dim)
    square = plgpu.layout_cast(jnp.zeros((BLOCK_K, ROWS), jnp.float32), layout)
    plgpu.barrier_wait(kv_ready.at[0])

    def accumulate(*terms):
      """[acc + a @ b for (acc, a, b) in terms], the products issued together and waited for
      once. On the GPU the accumulators stay where they are (pl.run_state), which keeps dK and
      dV out of a second set of registers; interpret mode has no run_state, so there each product
      goes to a fresh accumulator and is added."""
      if a_smem is not None:
        def fresh(acc, a, b):
          def run(out):
            plgpu.wgmma(out, a, b)
            return out[...]
          return acc + pl.run_scoped(run, plgpu.ACC(acc.shape, jnp.float32))
        return [fresh(*term) for term in terms]

      def run(refs):
        for ref, (_, a, b) in zip(refs, terms):
          plgpu.wgmma(ref, a, b)
      return list(pl.run_state(run)(tuple(plgpu.ACC.init(acc) for acc, _, _ in terms)))

    def operand(x, dtype):
      """x as a wgmma A operand: registers, or in interpret mode (whose wgmma takes operands from
      memory only) this warpgroup's staging buffer."""
      x = x.astype(dtype)
      if a_smem is None:
        return x
      a_smem.at[wg][...] = x
      plgpu.commit_smem()
      return a_smem.at[wg]

    def body(j, carry):
      dk, dv = carry
      n = 2 * j + wg
      slot = lax.rem(n, stages)
      entry = first + lax.div(n, chunks)
      tile = tiles_ref[batch, kv_head, entry]
      word = bits_ref[batch, kv_head, entry]
      plgpu.barrier_wait(unit_ready.at[slot])
      q_rows, do_rows = q_smem.at[slot], do_smem.at[slot]

      s_t, = accumulate((square, k_smem, q_rows.T))
      lse = plgpu.load(lse_smem.at[slot], layout=by_column)
      # (The masks' iotas are built here, not hoisted: with dK and dV resident, registers are
      # what this loop is short of.)
      key_pos = key_block * BLOCK_K + plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0,
                                                             layout=layout)
      token = lax.shift_right_logical(
          plgpu.broadcasted_iota(jnp.int32, s_t.shape, 1, layout=layout),
          hp.bit_length() - 1)                       # column // hp: its token in the tile
      picked = (lax.shift_right_logical(word, token) & 1) == 1
      visible = picked & (key_pos <= tile * wt + token)
      p_t = jnp.where(visible, jnp.exp2(s_t * scale2 - lax.broadcast_in_dim(lse, s_t.shape, [1])),
                      0.0)
      dv, dp_t = accumulate((dv, operand(p_t, do_rows.dtype), do_rows),
                            (square, v_smem, do_rows.T))
      delta = plgpu.load(delta_smem.at[slot], layout=by_column)
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
      dk, = accumulate((dk, operand(ds_t, q_rows.dtype), q_rows))
      plgpu.barrier_arrive(unit_free.at[slot])
      return dk, dv

    zeros = plgpu.layout_cast(jnp.zeros((BLOCK_K, head_dim), jnp.float32), layout)
    mine = lax.div(units - wg + 1, 2)                # units wg, wg + 2, ... below `units`
    dk, dv = lax.fori_loop(0, mine, body, (zeros, zeros))
    part = 2 * item + wg
    dk_ref[batch, kv_head, part] = dk
    dv_ref[batch, kv_head, part] = dv

  @pl.when(live & (wg == COMPUTE_WARPGROUPS))
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    keys = pl.ds(key_block * BLOCK_K, BLOCK_K)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem, kv_ready.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem, kv_ready.at[0])

    def load(n, slot, wait_free):
      if wait_free:
        plgpu.barrier_wait(unit_free.at[slot])
      tile = tiles_ref[batch, kv_head, first + lax.div(n, chunks)]
      chunk = kv_head * chunks + lax.rem(n, chunks)
      rows = pl.ds(tile * ROWS, ROWS)
      ready = unit_ready.at[slot]
      plgpu.copy_gmem_to_smem(q_ref.at[batch, chunk, rows], q_smem.at[slot], ready)
      plgpu.copy_gmem_to_smem(do_ref.at[batch, chunk, rows], do_smem.at[slot], ready)
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, chunk, rows], lse_smem.at[slot], ready)
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, chunk, rows], delta_smem.at[slot], ready)

    fill_slots(units, stages, load, lambda slot: plgpu.barrier_wait(unit_free.at[slot]))


@functools.partial(jax.jit, static_argnames=("heads_per_program", "group", "stages",
                                             "interpret"))
def dkdv_parts_mosaic(q_rows, k, v, do_rows, lse2, delta, items, tiles, bits, *,
                      heads_per_program: int, group: int, stages: int = 4,
                      interpret: bool = False):
  """q_rows, do_rows [b, heads // hp, t * hp, d] (`backward._row_major_vectors`); k, v
  [b, s, kv_heads, d] (s a multiple of 64); lse2 (base 2, +inf for rows that saw nothing) and
  delta [b, heads // hp, t * hp] float32; (items, tiles, bits) of `index.block_index(block_q=64 //
  hp, token_bits=True)`. Returns (dk_parts, dv_parts) float32 [b, kv_heads, 2 * n_items, 64, d]:
  item i's two parts at 2i and 2i + 1, unscaled."""
  batch, kv_len, kv_heads, head_dim = k.shape
  hp = heads_per_program
  if stages < 2 or stages % 2:
    raise ValueError(f"dkdv_parts_mosaic: stages must be even and >= 2 (each compute warpgroup "
                     f"takes every other slot), got {stages}")
  n_items = items.shape[2]
  dtype = q_rows.dtype
  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))

  def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, items_ref, tiles_ref, bits_ref,
            dk_ref, dv_ref):
    pl.run_scoped(
        lambda *scoped: _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, items_ref,
                                tiles_ref, bits_ref, dk_ref, dv_ref, scoped, hp=hp,
                                chunks=group // hp, stages=stages,
                                num_kv_blocks=kv_len // BLOCK_K),
        (plgpu.SMEM((BLOCK_K, head_dim), dtype, **tiled),
         plgpu.SMEM((BLOCK_K, head_dim), dtype, **tiled),
         plgpu.SMEM((stages, ROWS, head_dim), dtype, **tiled),
         plgpu.SMEM((stages, ROWS, head_dim), dtype, **tiled),
         plgpu.SMEM((stages, ROWS), jnp.float32),
         plgpu.SMEM((stages, ROWS), jnp.float32),
         plgpu.SMEM((COMPUTE_WARPGROUPS, BLOCK_K, ROWS), dtype, **tiled) if interpret else None),
        (plgpu.Barrier(num_arrivals=2, num_barriers=1),
         plgpu.Barrier(num_arrivals=4, num_barriers=stages)),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        collective_axes="wg",
    )

  part = jax.ShapeDtypeStruct((batch, kv_heads, 2 * n_items, BLOCK_K, head_dim), jnp.float32)
  params = dict(interpret=plgpu.InterpretGPUParams()) if interpret else {}
  return plgpu.kernel(
      entry,
      out_type=(part, part),
      # KV heads vary fastest, then items: neighbouring items (one key block's, or the next
      # block's, sharing many query tiles) run at once and share Q and dO through L2.
      grid=(kv_heads, n_items, batch),
      grid_names=("heads", "items", "batch"),
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **params,
  )(q_rows, k, v, do_rows, lse2, delta, items, tiles, bits)
