"""InfLLM-V2 block scoring (stages 1-3) as one Pallas kernel (Triton lowering).

One program = one KV head x `block_q` query tokens x all `group` query heads of that KV head
(the rows of every matmul tile are token-major (token, head) pairs). It never writes the
[tokens x compressed keys x heads] probabilities to HBM, only two pooled maxima per block:

  pass 1  online logsumexp of the scaled logits q.kc over the compressed windows each row may
          see (exact), or over the coarse windows (approximate_lse); rows that see no coarse
          window fall back to the exact normaliser, in a second loop that only tiles holding
          such rows run (queries within ~lse_window tokens of their document's start).
  pass 2  per tile of `block_windows` compressed windows: probabilities exp(logit - lse),
          summed over the group's heads, max-pooled onto selection blocks. Block j pools its own
          windows j*r ... j*r + r - 1 (r = block_size / stride: a reshape-max inside the tile)
          and the overlap - 1 windows just before j*r, the tail of block j - 1 (overlap - 1 < r
          is required). The kernel writes both maxima, `own` and `tail`, and the reader takes
          max(own[j], tail[j - 1]) (pallas_kernels/block_topk.merge_tail). Every window's
          probability is computed once, so two blocks that share their best window get bitwise
          equal scores and the top-k breaks the tie exactly as the reference does.

Visibility of window i to a query at position p (as `sparsejax.ops.infllmv2`): its last token
i*s + l - 1 <= p and its segment id (the id of all its tokens, -1 if it straddles two) equals the
query's. Invisible windows contribute probability 0, like the reference.

The elementwise work of both passes stays in the matmul's [(token, head) rows, windows] layout
(each row carries its position, segment and normaliser), and without segment ids the tiles that
every row of a program sees whole skip the mask. On the H100 that took the 128k scoring from
30.0 to 25.1 ms: the kernel was bound by instructions and shared-memory layout conversions, not
by its matmuls or exp2. Leaving the one-block shift of the tails to the reader took it to 21.7
(experiments/results/scoring_pass2.md).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention.forward import LOG2E, MASK_VALUE


def _visible(last, seg, row_pos, row_seg):
  """bool [rows, n]: window (last token, segment id or None) visible to each (token, head) row
  (its position and segment id, [rows] each)."""
  vis = last[None, :] <= row_pos[:, None]
  return vis if seg is None else vis & (seg[None, :] == row_seg[:, None])


def _windows_ended_by(q_pos, window, stride, count):
  """How many of `count` windows (`window` tokens every `stride`) end at or before q_pos."""
  return jnp.minimum(jnp.maximum((q_pos - window + 1) // stride + 1, 0), count)


def visible_tiles(q_pos, window, stride, count, tile):
  """Tiles of `tile` windows (of `count`, `window` tokens every `stride`) that hold a window
  whose last token is <= q_pos: the loop bound of a causal pass over the windows."""
  return (_windows_ended_by(q_pos, window, stride, count) + tile - 1) // tile


def _full_tiles(q_pos, window, stride, count, tile):
  """Tiles whose every window's last token is <= q_pos: seen whole by a query at q_pos."""
  return _windows_ended_by(q_pos, window, stride, count) // tile


def _logits(q2d, keys, scale2):
  """[rows, n] base-2 scaled logits of the (token, head) rows against `keys`."""
  return plgpu.dot(q2d, keys.T) * scale2


def _online_lse(q2d, keys_ref, last_ref, seg_ref, row_pos, row_seg, lo, full, hi, *, tile,
                scale2):
  """Base-2 logsumexp per (token, head) row over the visible windows of tiles [lo, hi), of
  which those below `full` are seen whole by every row (no mask). [rows]."""

  def body(masked, ti, carry):
    m_prev, l_prev = carry
    win = pl.ds(ti * tile, tile)
    s = _logits(q2d, keys_ref[win, :], scale2)
    if masked:
      vis = _visible(last_ref[win], None if seg_ref is None else seg_ref[win], row_pos, row_seg)
      s = jnp.where(vis, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_next[:, None])
    if masked:  # a row whose windows are all masked so far must add 0, not exp2(0) = 1s
      p = jnp.where(vis, p, 0.0)
    return m_next, l_prev * jnp.exp2(m_prev - m_next) + jnp.sum(p, axis=1)

  rows = row_pos.shape[0]
  carry = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32))
  full = jnp.maximum(jnp.minimum(full, hi), lo)
  carry = lax.fori_loop(lo, full, functools.partial(body, False), carry)
  m, l = lax.fori_loop(full, hi, functools.partial(body, True), carry)
  return jnp.where(l > 0, m + jnp.log2(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _ranking_keys(score, blocks, q_pos, *, block_size, init_blocks, local_blocks):
  """`selection_keys` of sparsejax.ops.infllmv2 without segment ids, for a [block_q, n] tile of
  scores of `blocks`: +inf forced (the first init_blocks blocks and the local_blocks ending at
  the query's own), -inf past the query's block, else the score (NaN -> the lowest finite)."""
  big = float(np.finfo(np.float32).max)   # a Python float: Triton cannot negate array constants
  q_block = (q_pos // block_size)[:, None]
  eligible = blocks[None, :] <= q_block
  forced = eligible & ((blocks[None, :] < init_blocks) | (blocks[None, :] > q_block - local_blocks))
  finite = jnp.clip(jnp.where(score == score, score, -big), -big, big)
  return jnp.where(forced, jnp.inf, jnp.where(eligible, finite, -jnp.inf))


def _block_scores_kernel(q_ref, kc_ref, last_ref, *rest, scale: float, block_q: int, group: int,
                         heads: int, block_windows: int, ratio: int, overlap: int, window: int,
                         stride: int, approximate: bool, lse_window: int, lse_stride: int,
                         segments: bool, ranking):
  rest = list(rest)
  tail_ref = rest.pop() if overlap > 1 else None
  out_ref = rest.pop()
  row_seg_ref, wseg_ref = (rest.pop(0), rest.pop(0)) if segments else (None, None)
  if approximate:
    kc2_ref, last2_ref = rest.pop(0), rest.pop(0)
    wseg2_ref = rest.pop(0) if segments else None
  qi = pl.program_id(0)
  d = q_ref.shape[-1]
  rows = block_q * group
  q2d = q_ref[...].reshape(rows, d)
  q0 = qi * block_q                        # the program's first query token
  q_pos = q0 + jnp.arange(block_q)
  # Every (token, head) row's position and segment: the elementwise work stays in the
  # matmul's [rows, windows] layout (no [block_q, group, windows] broadcasts).
  row_pos = q0 + jnp.arange(rows) // group
  row_seg = row_seg_ref[...] if segments else None
  scale2 = scale * LOG2E
  tile, tile_blocks = block_windows, block_windows // ratio
  total_tiles = kc_ref.shape[0] // tile

  last_query = q0 + block_q - 1
  n_tiles = visible_tiles(last_query, window, stride, kc_ref.shape[0], tile)
  # With segments any window may belong to another document: every tile is masked.
  n_full = 0 if segments else _full_tiles(q0, window, stride, kc_ref.shape[0], tile)
  lse_kw = dict(tile=tile, scale2=scale2)
  if approximate:
    c2 = kc2_ref.shape[0]
    n2 = visible_tiles(last_query, lse_window, lse_stride, c2, tile)
    full2 = 0 if segments else _full_tiles(q0, lse_window, lse_stride, c2, tile)
    lse = _online_lse(q2d, kc2_ref, last2_ref, wseg2_ref, row_pos, row_seg, 0, full2, n2,
                      **lse_kw)
    # Exact normaliser for rows without a coarse window; the loop is empty for other tiles.
    need = jnp.max(jnp.isneginf(lse).astype(jnp.int32)) > 0
    exact = _online_lse(q2d, kc_ref, last_ref, wseg_ref, row_pos, row_seg, 0, 0,
                        jnp.where(need, n_tiles, 0), **lse_kw)
    lse = jnp.where(jnp.isneginf(lse), exact, lse)
  else:
    lse = _online_lse(q2d, kc_ref, last_ref, wseg_ref, row_pos, row_seg, 0, n_full, n_tiles,
                      **lse_kw)
  lse = jnp.where(jnp.isneginf(lse), 0.0, lse)               # such rows see nothing anyway
  # Padded heads (zero queries) add nothing: an infinite normaliser makes their exp2 0.
  lse = jnp.where(jnp.arange(rows) % group < heads, lse, jnp.inf)[:, None]
  in_tail = (jnp.arange(ratio) >= ratio - (overlap - 1))[None, None, :]
  block = jnp.arange(tile_blocks)

  def finish(ti, scores):
    """What a tile writes: its scores, or with `ranking` their ranking keys."""
    if ranking is None:
      return scores
    return _ranking_keys(scores, ti * tile_blocks + block, q_pos, **ranking)

  def write(ti, pooled, tail):
    blocks = pl.ds(ti * tile_blocks, tile_blocks)
    out_ref[:, blocks] = finish(ti, pooled)
    if tail_ref is not None:
      tail_ref[:, blocks] = tail

  def score_tile(masked, ti, carry):
    win = pl.ds(ti * tile, tile)
    p = jnp.exp2(_logits(q2d, kc_ref[win, :], scale2) - lse)                 # [rows, tile]
    if masked:
      vis = _visible(last_ref[win], wseg_ref[win] if segments else None, row_pos, row_seg)
      p = jnp.where(vis, p, 0.0)
    probs = jnp.sum(p.reshape(block_q, group, tile), axis=1)                 # [block_q, tile]
    # Probabilities are >= 0 and invisible windows 0, so 0 is the neutral element of every max.
    per_block = probs.reshape(block_q, tile_blocks, ratio)
    tail = None
    if tail_ref is not None:  # block j's last overlap - 1 windows, which block j + 1 also pools
      tail = jnp.max(jnp.where(in_tail, per_block, 0.0), axis=2)
    write(ti, jnp.max(per_block, axis=2), tail)
    return carry

  lax.fori_loop(0, n_full, functools.partial(score_tile, False), None)
  lax.fori_loop(n_full, n_tiles, functools.partial(score_tile, True), None)

  def zero_tile(ti, carry):
    zeros = jnp.zeros((block_q, tile_blocks), jnp.float32)
    write(ti, zeros, zeros)
    return carry

  lax.fori_loop(n_tiles, total_tiles, zero_tile, None)  # (a literal carry does not lower)


@functools.partial(jax.jit, static_argnames=(
    "block_q", "heads", "block_windows", "ratio", "overlap", "window", "stride", "lse_window",
    "lse_stride", "ranking", "interpret", "num_warps", "num_stages"))
def block_scores_kernel(q, kc, last, coarse, segments, *, block_q: int, heads: int,
                        block_windows: int, ratio: int, overlap: int, window: int, stride: int,
                        lse_window: int, lse_stride: int, ranking=None, interpret: bool = False,
                        num_warps: int = 4, num_stages: int = 2):
  """Padded, laid-out inputs (see op.py): q [b, t, kv_heads * group, d] (group a power of two,
  `heads` real heads per group); kc [b, c_pad, kv_heads, d] with last [c_pad]; coarse = (kc2,
  last2, wseg2 or None) or None; segments = (q_seg [b, t], wseg [b, c_pad]) or None (one
  document per row: only the causal mask, and only on the tiles that straddle it). Returns
  (own, tail), float32 [b, t, kv_heads, c_pad / ratio] each: own = each block's max over its own
  windows, or with ranking (a tuple of (name, value) pairs: block_size, init_blocks,
  local_blocks; one document per row) the ranking keys of that; tail = each block's max over its
  last overlap - 1 windows (None when overlap is 1). A block's score is max(own[j], tail[j - 1])
  (`pallas_kernels.block_topk.merge_tail`): the reader takes it, since inside a tile the shift by
  one block costs more than writing and reading `tail` (experiments/results/scoring_pass2.md)."""
  batch, q_len, all_heads, d = q.shape
  kv_heads = kc.shape[2]
  group = all_heads // kv_heads
  c_pad = kc.shape[1]
  approximate = coarse is not None
  kernel = functools.partial(
      _block_scores_kernel, scale=1.0 / math.sqrt(d), block_q=block_q, group=group, heads=heads,
      block_windows=block_windows, ratio=ratio, overlap=overlap, window=window, stride=stride,
      approximate=approximate, lse_window=lse_window, lse_stride=lse_stride,
      segments=segments is not None, ranking=None if ranking is None else dict(ranking))
  keys_spec = lambda n: pl.BlockSpec((None, n, None, d), lambda i, b, h: (b, 0, h, 0))
  vector_spec = lambda n: pl.BlockSpec((n,), lambda i, b, h: (0,))
  row_spec = lambda n: pl.BlockSpec((None, n), lambda i, b, h: (b, 0))
  in_specs = [pl.BlockSpec((None, block_q, group, d), lambda i, b, h: (b, i, h, 0)),
              keys_spec(c_pad), vector_spec(c_pad)]
  args = [q, kc, last]
  if segments is not None:
    q_seg, wseg = segments
    # Each (token, head) row's segment id, token-major as the rows of the program's tiles.
    in_specs += [pl.BlockSpec((None, block_q * group), lambda i, b, h: (b, i)), row_spec(c_pad)]
    args += [jnp.repeat(q_seg, group, axis=1), wseg]
  if approximate:
    kc2, last2, wseg2 = coarse
    c2 = kc2.shape[1]
    in_specs += [keys_spec(c2), vector_spec(c2)]
    args += [kc2, last2]
    if segments is not None:
      in_specs.append(row_spec(c2))
      args.append(wseg2)
  blocks_padded = c_pad // ratio
  n_out = 2 if overlap > 1 else 1
  outs = pl.pallas_call(
      kernel,
      grid=(q_len // block_q, batch, kv_heads),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, block_q, None, blocks_padded),
                              lambda i, b, h: (b, i, h, 0))] * n_out,
      out_shape=[jax.ShapeDtypeStruct((batch, q_len, kv_heads, blocks_padded), jnp.float32)]
      * n_out,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="infllmv2_block_scores",
  )(*args)
  return outs[0], (outs[1] if overlap > 1 else None)
