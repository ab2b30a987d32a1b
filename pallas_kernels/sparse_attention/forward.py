"""Block-sparse flash attention, forward, as a Pallas kernel (Triton lowering: a first correct
GPU version; the Mosaic GPU version with TMA/wgmma is the next step).

One program = one query head x `block_q` query tokens. It loops over the union of the key blocks
its tokens selected (`index.query_block_unions`), loads each block of K and V once, and masks every
row to: the blocks its own token selected, causality (key index <= query index) and equal
segment ids. Online softmax in float32 (base 2), output in the input dtype plus the natural-log
logsumexp per row for the backward pass.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Large negative instead of -inf: exp2 of (masked - max) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def visible_tile(selected_blocks, block, q_pos, k_pos, q_seg, k_seg):
  """bool [rows, block_k]: a row sees a key of `block` when its own token selected the block,
  the key is not after it (causal) and both carry the same segment id. Shared by the forward
  and backward kernels, so all three mask identically."""
  picked = jnp.max((selected_blocks == block).astype(jnp.int32), axis=1) > 0
  return (picked[:, None] & (k_pos[None, :] <= q_pos[:, None])
          & (q_seg[:, None] == k_seg[None, :]))


def _forward_kernel(q_ref, k_ref, v_ref, sel_ref, q_seg_ref, kv_seg_ref, union_ref, *refs,
                    scale: float, block_q: int, block_k: int):
  o_ref, lse_ref = refs[-2:]  # (with poisoned outputs, the aliased input buffers come first)
  query_block = pl.program_id(0)
  q = q_ref[...]
  selected_blocks = sel_ref[...]                      # [block_q, topk] int32, -1 = unused slot
  q_seg = q_seg_ref[...]
  q_pos = query_block * block_q + jnp.arange(block_q)
  head_dim = q.shape[-1]

  def body(u, carry):
    acc, m_prev, l_prev = carry
    block = union_ref[u + 1]
    keys = pl.ds(block * block_k, block_k)
    k = k_ref[keys, :]
    logits = plgpu.dot(q, k.T) * (scale * LOG2E)
    visible = visible_tile(selected_blocks, block, q_pos, block * block_k + jnp.arange(block_k),
                           q_seg, kv_seg_ref[keys])
    logits = jnp.where(visible, logits, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(logits - m_next[:, None])
    l_next = l_prev * correction + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, union_ref[0], body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = (m + jnp.log2(l)) / LOG2E


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret", "num_warps",
                                             "num_stages", "poison"))
def sparse_attention_forward(q, k, v, selected, q_segment_ids, kv_segment_ids, unions, *,
                             block_q: int, block_k: int, interpret: bool = False,
                             num_warps: int = 4, num_stages: int = 2, poison: bool = False):
  """Padded inputs: q [b, t, heads, d], k/v [b, s, kv_heads, d] with t % block_q == 0 and
  s % block_k == 0; selected [b, t, kv_heads, topk_pow2] int32 (-1 unused); segment ids
  [b, t] / [b, s] int32 (padding must not match real tokens); unions from query_block_unions.
  Returns (out [b, t, heads, d], lse [b, heads, t] float32). poison=True writes into NaN-filled
  output buffers (tests: any tile the kernel fails to write stays NaN)."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  topk = selected.shape[-1]
  width = unions.shape[-1]
  grid = (q_len // block_q, batch, heads)
  kernel = functools.partial(_forward_kernel, scale=1.0 / math.sqrt(head_dim), block_q=block_q,
                             block_k=block_k)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)]
  out_specs = [
      pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
  ]
  poisoned, aliases = [], {}
  if poison:
    poisoned = [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
    aliases = {7: 0, 8: 1}
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
          pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
          pl.BlockSpec((None, block_q, None, topk), lambda i, b, h: (b, i, h // group, 0)),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
          pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, h // group, i, 0)),
      ] + (out_specs if poison else []),
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="sparse_attention_forward",
  )(q, k, v, selected, q_segment_ids, kv_segment_ids, unions, *poisoned)
