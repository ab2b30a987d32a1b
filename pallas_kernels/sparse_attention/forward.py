"""Block-sparse flash attention, forward, as a Pallas kernel (Triton lowering: a first correct
GPU version; the Mosaic GPU version with TMA/wgmma is the next step).

One program = `heads_per_program` query heads of one KV head x `block_q` query tokens; the rows
of its tiles are the (token, head) pairs, token-major. It loops over the union of the key blocks
its tokens selected (`index.query_block_unions`), loads each block of K and V once, and masks every
row to: the blocks its own token selected, causality (key index <= query index) and equal
segment ids. With per-token selections the union grows with the tokens of a program, so taking the
group's heads as rows (all heads of a KV head share the selection) keeps tiles of 64 rows over
only 64 / heads_per_program tokens: the layout of the InfLLM-V2 / NSA CUDA kernels. Online softmax in float32 (base 2), output in the input dtype plus the natural-log
logsumexp per row for the backward pass.

An optional per-key bias (NOSA's eviction scores, natural log) is added to the scaled logits of
every row; without one the kernel takes no bias input at all, so the unbiased path is unchanged.
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


def per_row(visible, heads_per_program: int):
  """A tile's token mask [block_q, block_k] on its rows, the token-major (token, head) pairs of
  heads_per_program heads: every head of a token shares its token's mask."""
  if heads_per_program == 1:
    return visible
  block_q, block_k = visible.shape
  return jnp.broadcast_to(visible[:, None, :], (block_q, heads_per_program, block_k)).reshape(
      block_q * heads_per_program, block_k)


def _forward_kernel(q_ref, k_ref, v_ref, sel_ref, q_seg_ref, kv_seg_ref, union_ref, *refs,
                    scale: float, block_q: int, block_k: int, heads_per_program: int,
                    biased: bool):
  # refs: the key bias [kv_len] (biased), the poisoned outputs' aliased inputs, then the outputs.
  bias_ref = refs[0] if biased else None
  o_ref, lse_ref = refs[-2:]
  query_block = pl.program_id(0)
  hp = heads_per_program
  rows = block_q * hp
  q = q_ref[...]
  head_dim = q.shape[-1]
  q = q.reshape(rows, head_dim)
  selected_blocks = sel_ref[...]                      # [block_q, topk] int32, -1 = unused slot
  q_seg = q_seg_ref[...]
  q_pos = query_block * block_q + jnp.arange(block_q)

  def body(u, carry):
    acc, m_prev, l_prev = carry
    block = union_ref[u + 1]
    keys = pl.ds(block * block_k, block_k)
    k = k_ref[keys, :]
    logits = plgpu.dot(q, k.T) * (scale * LOG2E)
    if biased:  # base 2 like the logits; one bias per key, shared by every row
      logits = logits + (bias_ref[keys] * LOG2E)[None, :]
    visible = visible_tile(selected_blocks, block, q_pos, block * block_k + jnp.arange(block_k),
                           q_seg, kv_seg_ref[keys])
    visible = per_row(visible, hp)
    logits = jnp.where(visible, logits, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(logits - m_next[:, None])
    l_next = l_prev * correction + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, union_ref[0], body, init)
  # A row that saw no key gets zeros and lse -inf, as the reference; never 0 / 0. Its running
  # max is what tells: in a tile where other rows see keys, its masked logits still add
  # exp(0) = 1 per key to l (its max stays at MASK_VALUE), so l > 0 would not.
  seen = m > MASK_VALUE
  out = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
  lse = jnp.where(seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) / LOG2E, -jnp.inf)
  if hp > 1:
    out = out.reshape(block_q, hp, head_dim)
    lse = lse.reshape(block_q, hp).T                  # the [heads, tokens] layout of lse_ref
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret", "num_warps",
                                             "num_stages", "poison", "heads_per_program"))
def sparse_attention_forward(q, k, v, selected, q_segment_ids, kv_segment_ids, unions,
                             key_bias=None, *,
                             block_q: int, block_k: int, interpret: bool = False,
                             num_warps: int = 4, num_stages: int = 2, poison: bool = False,
                             heads_per_program: int = 1):
  """Padded inputs: q [b, t, heads, d], k/v [b, s, kv_heads, d] with t % block_q == 0 and
  s % block_k == 0; selected [b, t, kv_heads, topk_pow2] int32 (-1 unused); segment ids
  [b, t] / [b, s] int32 (padding must not match real tokens); unions from query_block_unions
  at block_q tokens; heads_per_program divides heads // kv_heads. key_bias: None or float32
  [b, kv_heads, s], added (natural log) to the scaled logits of each KV head's query heads.
  Returns (out [b, t, heads, d], lse [b, heads, t] float32). poison=True writes into NaN-filled
  output buffers (tests: any tile the kernel fails to write stays NaN)."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  topk = selected.shape[-1]
  width = unions.shape[-1]
  hp = heads_per_program
  grid = (q_len // block_q, batch, heads // hp)
  kernel = functools.partial(_forward_kernel, scale=1.0 / math.sqrt(head_dim), block_q=block_q,
                             block_k=block_k, heads_per_program=hp, biased=key_bias is not None)
  head_block = None if hp == 1 else hp  # a squeezed head axis for one head per program
  kv_head = lambda h: h * hp // group
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)]
  out_specs = [
      pl.BlockSpec((None, block_q, head_block, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, head_block, block_q), lambda i, b, h: (b, h, i)),
  ]
  bias, bias_specs = [], []
  if key_bias is not None:
    bias = [key_bias.astype(jnp.float32)]
    bias_specs = [pl.BlockSpec((None, None, kv_len), lambda i, b, h: (b, kv_head(h), 0))]
  poisoned, aliases = [], {}
  if poison:
    poisoned = [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
    aliases = {7 + len(bias): 0, 8 + len(bias): 1}
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, block_q, head_block, head_dim), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, kv_head(h), 0)),
          pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, kv_head(h), 0)),
          pl.BlockSpec((None, block_q, None, topk), lambda i, b, h: (b, i, kv_head(h), 0)),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
          pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, kv_head(h), i, 0)),
      ] + bias_specs + (out_specs if poison else []),
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="sparse_attention_forward",
  )(q, k, v, selected, q_segment_ids, kv_segment_ids, unions, *bias, *poisoned)
