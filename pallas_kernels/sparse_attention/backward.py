"""Block-sparse flash attention, backward, as two Pallas kernels (Triton lowering).

  dq:     one program = one query head x `block_q` query tokens, looping over the union of key
          blocks its tokens selected (the forward's loop), recomputing the probabilities from the
          forward's logsumexp.
  dk, dv: one program = one KV head x one key block, looping over the query blocks that selected
          it (the transposed index, `index.block_index`) and over the query heads of its group,
          so every dk/dv tile is written by exactly one program (no atomics).

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

from pallas_kernels.sparse_attention.forward import LOG2E, visible_tile




def _probs_and_dlogits(q, k, v, do, lse2, delta, visible, scale):
  """Recomputed probabilities P and dS = P * (dP - delta) for one (query rows x key block) tile."""
  logits2 = plgpu.dot(q, k.T) * (scale * LOG2E)
  p = jnp.where(visible, jnp.exp2(logits2 - lse2[:, None]), 0.0)
  dp = plgpu.dot(do, v.T)
  return p, p * (dp - delta[:, None])


def _dq_kernel(q_ref, k_ref, v_ref, sel_ref, q_seg_ref, kv_seg_ref, union_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, scale: float, block_q: int, block_k: int):
  query_block = pl.program_id(0)
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse_ref[...] * LOG2E      # base-2 logsumexp of the scaled logits
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
    _, ds = _probs_and_dlogits(q, k, v, do, lse2, delta, visible, scale)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, union_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, sel_ref, q_seg_ref, kv_seg_ref, queries_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float, block_q: int,
                 block_k: int, group: int):
  key_block = pl.program_id(0)
  kv_head = pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  k_seg = kv_seg_ref[...]
  k_pos = key_block * block_k + jnp.arange(block_k)

  def over_query_blocks(i, carry):
    query_block = queries_ref[i + 1]
    rows = pl.ds(query_block * block_q, block_q)
    q_pos = query_block * block_q + jnp.arange(block_q)
    visible = visible_tile(sel_ref[rows, :], key_block, q_pos, k_pos, q_seg_ref[rows], k_seg)

    def over_heads(g, carry):
      dk, dv = carry
      head = kv_head * group + g
      q = q_ref[rows, head, :]
      do = do_ref[rows, head, :]
      lse2 = lse_ref[head, rows] * LOG2E
      delta = delta_ref[head, rows]
      p, ds = _probs_and_dlogits(q, k, v, do, lse2, delta, visible, scale)
      dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
      dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
      return dk, dv

    return lax.fori_loop(0, group, over_heads, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, queries_ref[0], over_query_blocks, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret", "num_warps",
                                             "num_stages"))
def sparse_attention_backward(q, k, v, selected, q_segment_ids, kv_segment_ids, unions,
                              kv_queries, lse, delta, d_out, *, block_q: int, block_k: int,
                              interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """Padded inputs as in `sparse_attention_forward`, its lse [b, heads, t], delta [b, heads, t]
  (rowsum(dO * O) - dLSE) and the output cotangent. Returns (dq, dk, dv) like q, k, v."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  topk = selected.shape[-1]
  scale = 1.0 / math.sqrt(head_dim)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)

  q_tile = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_all = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
  row_vec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k),
      grid=(q_len // block_q, batch, heads),
      in_specs=[
          q_tile, kv_all, kv_all,
          pl.BlockSpec((None, block_q, None, topk), lambda i, b, h: (b, i, h // group, 0)),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
          pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, None, None, unions.shape[-1]), lambda i, b, h: (b, h // group, i, 0)),
          q_tile, row_vec, row_vec,
      ],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="sparse_attention_dq",
  )(q, k, v, selected, q_segment_ids, kv_segment_ids, unions, d_out, lse, delta)

  q_all = pl.BlockSpec((None, q_len, heads, head_dim), lambda j, b, h: (b, 0, 0, 0))
  kv_tile = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
  rows_all = pl.BlockSpec((None, heads, q_len), lambda j, b, h: (b, 0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, block_q=block_q, block_k=block_k, group=group),
      grid=(kv_len // block_k, batch, kv_heads),
      in_specs=[
          q_all, kv_tile, kv_tile,
          pl.BlockSpec((None, q_len, None, topk), lambda j, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
          pl.BlockSpec((None, block_k), lambda j, b, h: (b, j)),
          pl.BlockSpec((None, None, None, kv_queries.shape[-1]), lambda j, b, h: (b, h, j, 0)),
          q_all, rows_all, rows_all,
      ],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="sparse_attention_dkdv",
  )(q, k, v, selected, q_segment_ids, kv_segment_ids, kv_queries, d_out, lse, delta)
  return dq, dk, dv
