"""InfLLM-V2's decode-time selection keys from the cached compressed keys, as two Pallas kernels
(Triton lowering).

  decode_selection_keys(q, kc, cfg, *, kv_len, q_start, kc_coarse=None, segment_ids=None,
                        kv_segment_ids=None, implementation="pallas" | "interpret" | "reference")
      -> float32 [batch, 1, kv_heads, n_keys]

  select_decode_blocks(... the same arguments) -> (block_idx int32, block_valid bool)
      [batch, 1, kv_heads, width >= decode_width]

Same as `decode_selection_keys` of sparsejax.ops.infllmv2 (the reference) for one query token
per row (+inf forced, -inf ineligible, else the block score), with n_keys >= ceil(kv_len /
block_size): the columns past the last block are -inf, so the top-k reads them as padding.
`select_decode_blocks` is the reference's `select_decode_blocks` with the top-k (and the dense
fallback) run by the scores kernel's last split of each row: two launches fewer a step, the
same time on the H100 (the top-k's cost is its ~20 radix passes on one program, not its launch;
experiments/results/decode_1207f.md). The layer's decode step (pallas_kernels/infllmv2_decode)
adds programs to the scores kernel that attend the forced blocks meanwhile
(`select_and_attend_forced`); its selection then lists only the unforced winners.

Why kernels: in XLA a decode step's selection is about a dozen small fusions (logits, two
logsumexp reductions, probabilities, group sum, max-pool, eligibility, forced blocks), each a
launch of a few microseconds over a few MB; at 128k the whole InfLLM-V2 decode step took 0.092
ms on the H100 where its bytes need 0.020 (experiments/results/kernel_tuning_run.md). Two kernels
replace them, and read the compressed keys once:

  logits      grid (row, KV head, split): the `group` query heads of the row's KV head are the
              rows of every tile (padded to >= 16 for tl.dot); each split takes an equal share
              of the tiles (block_windows compressed windows = block_windows / ratio blocks)
              that hold a block <= the query's, stores their base-2 logits (-inf where a window
              is invisible) to a [rows, windows] scratch in HBM, and writes each head's partial
              (m, l) over them; with approximate_lse also an online logsumexp over its share of
              the visible coarse windows.
  scores      grid (row, KV head, split): merges the partials into each head's logsumexp (the
              coarse one where the head saw a coarse window, else the exact one), then over the
              same share, tile by tile from the scratch: probabilities, the sum over the group's
              heads, the max-pool onto blocks (a block's own windows and the overlap - 1 windows
              before them, carried across tiles: a share starts one tile early for that carry),
              and the ranking key. Blocks past the query's own are written -inf by the splits'
              static shares.

The scratch is 4 bytes per (query head, window): 8 MB at batch 8, 32 heads, 128k, against the
33.5 MB of compressed keys that a second pass over them would read again. On the H100 at that
shape the two kernels take 16.2 + 7.6 us of a decode step, where a normaliser kernel and a
scores kernel that recomputed the logits took 14.9 + 15.8 (experiments/results/
decode_one_pass.md). The exact normaliser's partials come free with the stored logits, so
approximate_lse adds a loop here rather than saving one.

Segment ids (as the model's cache passes them) become three small XLA arrays first: each
window's segment id (-1 when it straddles two), and per block whether it holds a key of the
query's document; without segment ids there is no XLA work before the kernels.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_scores.kernel import visible_tiles
from pallas_kernels.block_topk.kernel import select_row
from pallas_kernels.sparse_attention.forward import LOG2E, MASK_VALUE
from pallas_kernels.sparse_attention.index import next_power_of_2
from pallas_kernels.sparse_decode.kernel import attend_blocks, last_to_arrive, write_partial
from sparsejax.ops import infllmv2 as reference

IMPLEMENTATIONS = ("pallas", "interpret", "reference")
_BIG = float(np.finfo(np.float32).max)


def _visible(first, tile, q_pos, window, stride, count, wseg_ref, q_seg):
  """bool [tile]: which of windows [first, first + tile) exist and are visible at q_pos."""
  windows = first + jnp.arange(tile)
  vis = (windows < count) & (windows * stride + window - 1 <= q_pos)
  if wseg_ref is not None:
    seg = plgpu.load(wseg_ref.at[pl.ds(first, tile)], mask=windows < count, other=-1)
    vis &= seg == q_seg
  return vis


def _tile_logits(q, keys_ref, first, tile, count, scale2):
  """Base-2 scaled logits [rows, tile] of the query rows against windows [first, first + tile)
  (windows past `count` load zeros; callers mask them)."""
  windows = first + jnp.arange(tile)
  keys = plgpu.load(keys_ref.at[pl.ds(first, tile), :], mask=(windows < count)[:, None],
                    other=0.0)
  return plgpu.dot(q, keys.T) * scale2


def _online_lse(q, keys_ref, wseg_ref, q_pos, q_seg, lo, hi, *, tile, count, window, stride,
                scale2, logits_ref=None):
  """(m, l) base 2 per query row over the visible windows of tiles [lo, hi); with logits_ref,
  also stores each tile's logits there (-inf where invisible)."""

  def body(t, carry):
    m_prev, l_prev = carry
    s = _tile_logits(q, keys_ref, t * tile, tile, count, scale2)
    vis = _visible(t * tile, tile, q_pos, window, stride, count, wseg_ref, q_seg)[None, :]
    if logits_ref is not None:
      logits_ref[:, pl.ds(t * tile, tile)] = jnp.where(vis, s, -jnp.inf)
    s = jnp.where(vis, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.where(vis, jnp.exp2(s - m_next[:, None]), 0.0)
    return m_next, l_prev * jnp.exp2(m_prev - m_next) + jnp.sum(p, axis=1)

  rows = q.shape[0]
  init = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32))
  return lax.fori_loop(lo, hi, body, init)


def _finish_lse(m, l):
  return jnp.where(l > 0, m + jnp.log2(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _block_tiles(q_pos, block_size, tile_blocks):
  """Tiles of `tile_blocks` blocks that hold a block <= the query's: both kernels' loop bound."""
  return (q_pos // block_size) // tile_blocks + 1


def _share(split, splits, n):
  """[lo, hi): a split's equal share of n tiles (the same in both kernels)."""
  per = (n + splits - 1) // splits
  lo = jnp.minimum(split * per, n)
  return lo, jnp.minimum(lo + per, n)


def _logits_kernel(pos_ref, q_ref, kc_ref, *refs, tile, count, window, stride, splits, scale2,
                   segments, coarse, block_size, ratio):
  refs = list(refs)
  wseg_ref = refs.pop(0) if segments else None
  if coarse:
    kc2_ref = refs.pop(0)
    wseg2_ref = refs.pop(0) if segments else None
  logits_ref, m_ref, l_ref = refs[:3]
  split = pl.program_id(2)
  q_pos, q_seg = pos_ref[0], pos_ref[1]
  q = q_ref[...]
  lo, hi = _share(split, splits, _block_tiles(q_pos, block_size, tile // ratio))
  m, l = _online_lse(q, kc_ref, wseg_ref, q_pos, q_seg, lo, hi, tile=tile, count=count,
                     window=window, stride=stride, scale2=scale2, logits_ref=logits_ref)
  m_ref[...] = m
  l_ref[...] = l
  if coarse:
    m2_ref, l2_ref = refs[3:5]
    window2, stride2 = coarse
    count2 = kc2_ref.shape[0]
    lo, hi = _share(split, splits, visible_tiles(q_pos, window2, stride2, count2, tile))
    m2, l2 = _online_lse(q, kc2_ref, wseg2_ref, q_pos, q_seg, lo, hi, tile=tile, count=count2,
                         window=window2, stride=stride2, scale2=scale2)
    m2_ref[...] = m2
    l2_ref[...] = l2


def _merged_lse(m_ref, l_ref):
  """Each head's base-2 logsumexp from the splits' partials [splits, rows]."""
  m_parts, l_parts = m_ref[...], l_ref[...]
  m_all = jnp.max(m_parts, axis=0)
  return _finish_lse(m_all, jnp.sum(l_parts * jnp.exp2(m_parts - m_all[None, :]), axis=0))


def _scores_kernel(pos_ref, logits_ref, m_ref, l_ref, *refs, tile, ratio, overlap, heads,
                   splits, segments, approximate, init_blocks, local_blocks, block_size, select,
                   forced_splits, interpret):
  refs = list(refs)
  # Outputs last: keys; with select the indices and the arrival counter; with forced_splits
  # the forced blocks' partials (out, lse).
  forced_out = (refs.pop(-2), refs.pop()) if forced_splits else None
  if select:
    count_ref, idx_ref = refs.pop(), refs.pop()
  out_ref = refs.pop()
  if select:
    refs.pop()  # the arrival counter's aliased input
  if approximate:
    m2_ref, l2_ref = refs.pop(0), refs.pop(0)
  doc_ref = refs.pop(0) if segments else None
  # Program ids outside the branches below (interpret mode cannot lower them inside one). The
  # forced-block programs follow the scoring ones along the split axis, the slowest-varying of
  # the launch grid. Launched first, they made the kernel slower (21.1-21.3 us against 20.1;
  # experiments/results/decode_1207h.md), likely because the scoring splits, whose top-k tail
  # is the longer chain, then start later (not profiled).
  split = pl.program_id(2)
  row = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)

  def scores():
    q_pos = pos_ref[0]
    rows = logits_ref.shape[0]
    tile_blocks = tile // ratio

    # Each head's normaliser: the coarse one where it saw a window, else the exact one.
    lse = _merged_lse(m_ref, l_ref)
    if approximate:
      coarse_lse = _merged_lse(m2_ref, l2_ref)
      lse = jnp.where(jnp.isneginf(coarse_lse), lse, coarse_lse)
    lse = jnp.where(jnp.isneginf(lse), 0.0, lse)                     # such rows see nothing
    head_ok = jnp.arange(rows) < heads

    q_block = q_pos // block_size
    block_in_tile = jnp.arange(tile_blocks)
    in_tail = (jnp.arange(ratio) >= ratio - (overlap - 1))[None, :]
    follows = block_in_tile[:, None] == block_in_tile[None, :] + 1      # [j, j']: j' = j - 1
    first_col, last_col = block_in_tile == 0, block_in_tile == tile_blocks - 1

    def tile_scores(t):
      """(pooled own-window max [tile_blocks], tail max [tile_blocks]) of tile t."""
      s = logits_ref[:, pl.ds(t * tile, tile)]                         # -inf: invisible
      probs = jnp.where(head_ok[:, None], jnp.exp2(s - lse[:, None]), 0.0)
      per_block = jnp.sum(probs, axis=0).reshape(tile_blocks, ratio)
      return jnp.max(per_block, axis=1), jnp.max(jnp.where(in_tail, per_block, 0.0), axis=1)

    def eligible_blocks(t):
      ok = t * tile_blocks + block_in_tile <= q_block
      if segments:
        ok &= doc_ref[pl.ds(t * tile_blocks, tile_blocks)] > 0
      return ok

    # The logits kernel's shares of the visible tiles; a share starts one tile early (when it has
    # one) for the carry of that tile's last block tail.
    n_tiles = _block_tiles(q_pos, block_size, tile_blocks)
    lo, hi = _share(split, splits, n_tiles)
    previous_tail = tile_scores(jnp.maximum(lo - 1, 0))[1]
    carry = jnp.where(lo > 0, jnp.max(jnp.where(last_col, previous_tail, 0.0)), 0.0)
    # Eligible blocks before this share, for the init blocks' rank.
    if segments:
      prior_blocks = jnp.arange(doc_ref.shape[0])
      doc = doc_ref[...]
      before = jnp.sum(((doc > 0) & (prior_blocks < lo * tile_blocks)
                        & (prior_blocks <= q_block)).astype(jnp.int32))
    else:
      before = jnp.minimum(lo * tile_blocks, q_block + 1)

    def score_tile(t, state):
      carry, before = state
      pooled, tail = tile_scores(t)
      prev_tail = jnp.max(jnp.where(follows, tail[None, :], 0.0), axis=1)
      prev_tail = jnp.maximum(prev_tail, jnp.where(first_col, carry, 0.0))
      score = jnp.maximum(pooled, prev_tail)
      blocks = t * tile_blocks + block_in_tile
      eligible = eligible_blocks(t)
      rank = before + jnp.cumsum(eligible.astype(jnp.int32))
      forced = eligible & ((rank <= init_blocks) | (blocks > q_block - local_blocks))
      finite = jnp.clip(jnp.where(score == score, score, -_BIG), -_BIG, _BIG)
      out_ref[pl.ds(t * tile_blocks, tile_blocks)] = jnp.where(
          forced, jnp.inf, jnp.where(eligible, finite, -jnp.inf))
      return (jnp.max(jnp.where(last_col, tail, 0.0)),
              before + jnp.sum(eligible.astype(jnp.int32)))

    lax.fori_loop(lo, hi, score_tile, (carry, before))

    # Tiles past the query's block: -inf, each split its static share.
    total = out_ref.shape[0] // tile_blocks
    static = (total + splits - 1) // splits
    first = jnp.maximum(split * static, n_tiles)

    def fill(t, c):
      out_ref[pl.ds(t * tile_blocks, tile_blocks)] = jnp.full((tile_blocks,), -jnp.inf,
                                                              jnp.float32)
      return c

    lax.fori_loop(first, jnp.minimum((split + 1) * static, total), fill, 0)

    if select:
      # The split of a (row, KV head) that finishes last selects its blocks from the keys all the
      # splits wrote (read back with volatile loads): one top-k launch and its wait fewer per
      # decode step.
      pl.when(last_to_arrive(count_ref, row, splits, interpret=interpret))(functools.partial(
          _select_blocks, out_ref, idx_ref, q_pos, block_size=block_size, select=select,
          exclude_forced=bool(forced_splits)))

  if not forced_splits:
    scores()
    return
  pl.when(split < splits)(scores)
  # The other programs attend the forced blocks while the selection runs (q, k, v and the key
  # segment ids are the inputs after the partials and documents).
  q_ref, k_ref, v_ref = refs[:3]
  kv_seg_ref = refs[3] if segments else None
  pl.when(split >= splits)(functools.partial(
      _attend_forced, pos_ref, q_ref, k_ref, v_ref, kv_seg_ref, doc_ref, *forced_out,
      part=split - splits, parts=forced_splits, init_blocks=init_blocks,
      local_blocks=local_blocks, block_size=block_size, dense_len=select[2]))


def _attend_forced(pos_ref, q_ref, k_ref, v_ref, kv_seg_ref, doc_ref, o_ref, lse_ref, *, part,
                   parts, init_blocks, local_blocks, block_size, dense_len):
  """Partial `part` of `parts`: the attention of the row's query heads to its forced blocks
  (the local window's, then the init blocks before it: the first init_blocks blocks holding a
  key of the query's document), written as sparse_decode's partials for its combine. A row
  below dense_len writes nothing seen (its selection lists every block)."""
  q_pos, q_seg = pos_ref[0], pos_ref[1]
  q_block = q_pos // block_size
  n_local = jnp.minimum(local_blocks, q_block + 1)
  local_first = q_block - n_local + 1
  if doc_ref is None:
    inits = [jnp.int32(j) for j in range(init_blocks)]
  else:  # the scores kernel's ranks: eligible blocks in order
    blocks = jnp.arange(doc_ref.shape[0])
    eligible = (doc_ref[...] > 0) & (blocks <= q_block)
    rank = jnp.cumsum(eligible.astype(jnp.int32))
    inits = [jnp.min(jnp.where(eligible & (rank == j + 1), blocks, doc_ref.shape[0]))
             for j in range(init_blocks)]
  # Ascending, so the init blocks before the local window are a prefix of them.
  n_init = sum(((b < local_first).astype(jnp.int32) for b in inits), jnp.int32(0))
  total = jnp.where(q_pos + 1 < dense_len, 0, n_init + n_local)
  per_part = lax.div(total + parts - 1, parts)
  lo = jnp.minimum(part * per_part, total)
  hi = jnp.minimum(lo + per_part, total)

  def block_of(u):
    block = local_first + u - n_init
    for j, init in enumerate(inits):
      block = jnp.where(u == j, init, block)
    return block

  q = q_ref[...]
  acc, m, l = attend_blocks(q.astype(k_ref.dtype), k_ref, v_ref, block_of, lo, hi,
                            length=q_pos + 1, scale=1.0 / math.sqrt(q.shape[-1]),
                            block_k=block_size, capacity=k_ref.shape[0], kv_seg_ref=kv_seg_ref,
                            q_seg=q_seg)
  write_partial(o_ref, lse_ref, part, acc, m, l)


def _select_blocks(keys_ref, idx_ref, q_pos, *, block_size, select, exclude_forced):
  """One row's decode selection into idx_ref [2 * slots]: below dense_len every block up to the
  query's, else the top-k of the keys (select_row); then -1 (select_decode_blocks' rule). With
  forced programs (exclude_forced), a selecting row lists only its unforced winners: the top
  (topk - #forced) of its finite keys."""
  topk, slots, dense_len = select
  dense = q_pos + 1 < dense_len

  @pl.when(dense)
  def _dense():
    columns = jnp.arange(2 * slots)
    idx_ref[...] = jnp.where(columns < (q_pos + block_size) // block_size, columns, -1)

  @pl.when(jnp.logical_not(dense))
  def _top():
    key = plgpu.load(keys_ref.at[pl.ds(0, keys_ref.shape[0])], volatile=True)
    winners = topk
    if exclude_forced:
      forced = key == jnp.inf
      winners = topk - jnp.sum(forced.astype(jnp.int32))
      key = jnp.where(forced, -jnp.inf, key)
    target, value = select_row(key, winners, slots)
    plgpu.store(idx_ref.at[target], value)


@functools.partial(jax.jit, static_argnames=(
    "heads", "tile", "splits", "window", "stride", "lse_window", "lse_stride", "block_size",
    "init_blocks", "local_blocks", "n_out", "select", "interpret", "num_warps", "num_stages",
    "scores_num_warps", "forced_splits"))
def decode_keys_kernels(pos, qg, kc, coarse, wseg, doc, *, heads, tile, splits, window, stride,
                        lse_window, lse_stride, block_size, init_blocks, local_blocks, n_out,
                        select=None, interpret=False, num_warps=4, num_stages=2,
                        scores_num_warps=None, forced=None, forced_splits=0):
  """pos [b, 2] int32 (query position, query segment); qg [b, kv_heads, rows, d] (rows >= 16,
  `heads` real); kc [b, c, kv_heads, d]; coarse (kc2 [b, c2, kv_heads, d], wseg2 [b, c2] or None)
  or None; wseg [b, c] and doc [b, n_doc] int32 (a power of two >= n_out) or None (no segments).
  Returns float32 keys [b, kv_heads, n_out] (n_out a multiple of tile / ratio); with select =
  (topk, slots, dense_len) (slots a power of two, 2 * slots <= n_out) the scores kernel also
  selects, and it returns (keys, int32 block indices [b, kv_heads, 2 * slots]).
  forced = (k, v [b, capacity, kv_heads, d], kv_seg [b, capacity] or None) with forced_splits
  > 0 and select: forced_splits more programs per (row, KV head) attend the forced blocks while
  the others score and select (the indices then hold the unforced winners only), and it returns
  (keys, indices, out float32 [b, kv_heads, forced_splits * rows, d], lse [b, kv_heads,
  forced_splits * rows]): partials for sparse_decode's extra_partials. scores_num_warps: the
  scores kernel's (default num_warps)."""
  batch, kv_heads, rows, d = qg.shape
  ratio = block_size // stride
  segments = wseg is not None
  approximate = coarse is not None
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  pos_spec = pl.BlockSpec((None, 2), lambda b, h, s: (b, 0))
  q_spec = pl.BlockSpec((None, None, rows, d), lambda b, h, s: (b, h, 0, 0))
  keys_spec = lambda n: pl.BlockSpec((None, n, None, d), lambda b, h, s: (b, 0, h, 0))
  row_spec = lambda n: pl.BlockSpec((None, n), lambda b, h, s: (b, 0))
  part_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))
  # Every block tile's logits, the splits writing their shares: [b, kv_heads, rows, width].
  width = n_out * ratio
  logits_spec = pl.BlockSpec((None, None, rows, width), lambda b, h, s: (b, h, 0, 0))

  c = kc.shape[1]
  in_specs, args = [pos_spec, q_spec, keys_spec(c)], [pos, qg, kc]
  if segments:
    in_specs.append(row_spec(c))
    args.append(wseg)
  if approximate:
    kc2, wseg2 = coarse
    in_specs.append(keys_spec(kc2.shape[1]))
    args.append(kc2)
    if segments:
      in_specs.append(row_spec(kc2.shape[1]))
      args.append(wseg2)
  part_shape = jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32)
  n_parts = 4 if approximate else 2
  logits, *parts = pl.pallas_call(
      functools.partial(_logits_kernel, tile=tile, count=c, window=window, stride=stride,
                        splits=splits, scale2=LOG2E / math.sqrt(d), segments=segments,
                        coarse=(lse_window, lse_stride) if approximate else None,
                        block_size=block_size, ratio=ratio),
      grid=(batch, kv_heads, splits), in_specs=in_specs,
      out_specs=[logits_spec] + [part_spec] * n_parts,
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, rows, width), jnp.float32)]
      + [part_shape] * n_parts,
      compiler_params=params, interpret=interpret, name="infllmv2_decode_logits")(*args)

  parts_spec = pl.BlockSpec((None, None, splits, rows), lambda b, h, s: (b, h, 0, 0))
  in_specs = [pos_spec, logits_spec] + [parts_spec] * n_parts
  args = [pos, logits, *parts]
  if segments:
    in_specs.append(row_spec(doc.shape[1]))
    args.append(doc)
  if forced_splits:
    k, v, kv_seg = forced
    capacity = k.shape[1]
    in_specs += [q_spec, keys_spec(capacity), keys_spec(capacity)]
    args += [qg, k, v]
    if segments:
      in_specs.append(row_spec(capacity))
      args.append(kv_seg)
  out_specs = [pl.BlockSpec((None, None, n_out), lambda b, h, s: (b, h, 0))]
  out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, n_out), jnp.float32)]
  aliases = {}
  if select:
    slots = select[1]
    count_spec = pl.BlockSpec((batch * kv_heads,), lambda b, h, s: (0,))
    out_specs += [pl.BlockSpec((None, None, 2 * slots), lambda b, h, s: (b, h, 0)), count_spec]
    out_shape += [jax.ShapeDtypeStruct((batch, kv_heads, 2 * slots), jnp.int32),
                  jax.ShapeDtypeStruct((batch * kv_heads,), jnp.int32)]
    # The arrival counter starts at zero on every call.
    aliases = {len(args): 2}
    in_specs.append(count_spec)
    args.append(jnp.zeros((batch * kv_heads,), jnp.int32))
  if forced_splits:
    width = forced_splits * rows
    out_specs += [pl.BlockSpec((None, None, width, d), lambda b, h, s: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, width), lambda b, h, s: (b, h, 0))]
    out_shape += [jax.ShapeDtypeStruct((batch, kv_heads, width, d), jnp.float32),
                  jax.ShapeDtypeStruct((batch, kv_heads, width), jnp.float32)]
  keys, *selected = pl.pallas_call(
      functools.partial(_scores_kernel, tile=tile, ratio=ratio, overlap=window // stride,
                        heads=heads, splits=splits, segments=segments,
                        approximate=approximate, init_blocks=init_blocks,
                        local_blocks=local_blocks, block_size=block_size, select=select,
                        forced_splits=forced_splits, interpret=interpret),
      grid=(batch, kv_heads, splits + forced_splits), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=scores_num_warps or num_warps,
                                           num_stages=num_stages),
      interpret=interpret, name="infllmv2_decode_scores")(*args)
  if forced_splits:
    return keys, selected[0], selected[-2], selected[-1]
  return (keys, selected[0]) if select else keys


def _window_segments(kv_seg, count, window, stride):
  """[b, count] int32: each window's segment id, -1 when it straddles two."""
  idx = np.arange(count)[:, None] * stride + np.arange(window)[None, :]
  tokens = kv_seg[:, idx]
  return jnp.where(jnp.all(tokens == tokens[:, :, :1], axis=-1), tokens[:, :, 0], -1)


def default_splits(batch: int, kv_heads: int, tiles: int) -> int:
  """Programs per (row, KV head): about 512 in all, 4 per SM of an H100 (132), so that one
  program's loads hide another's latency (at one per SM the kernels took 2.5-3.5x the time of
  reading the keys: at batch 8 x 2 KV heads, 128k, a decode step took 0.128 ms at 8 splits,
  0.097 at 16 and 0.090 at 32; experiments/results/kernel_dkdv_run.md); at most one per tile,
  a power of two (the scores kernel loads the [splits, rows] partials as one Triton block)."""
  most = max(1, min(tiles, 512 // max(1, batch * kv_heads)))
  return 1 << (most.bit_length() - 1)


def _kernel_inputs(fn, q, kc, cfg, *, kv_len, q_start, kc_coarse, segment_ids, kv_segment_ids,
                   implementation, block_windows, splits, min_out=0):
  """Checks the op's arguments. Returns (args, options, kw): the kernels' positional arguments
  and their keyword arguments but `select` and the launch knobs (both None for
  implementation="reference"), and the reference op's keyword arguments. min_out: the least
  width of the kernels' keys (n_out)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{fn}: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if q.ndim != 4 or q.shape[1] != 1:
    raise ValueError(f"{fn}: q must be [batch, 1, num_heads, head_dim] (one token), got {q.shape}")
  if (segment_ids is None) != (kv_segment_ids is None):
    raise ValueError(f"{fn}: pass both segment_ids and kv_segment_ids, or neither")
  b = q.shape[0]
  q_start = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32).reshape(-1), (b,))
  kw = dict(kv_len=kv_len, q_start=q_start, kc_coarse=kc_coarse, segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids)
  if implementation == "reference":
    return None, None, kw
  # The reference's own checks (shapes of kc, kc_coarse, segments), on abstract values only.
  jax.eval_shape(lambda q, kc: reference.decode_selection_keys(q, kc, cfg, **kw), q, kc)
  ratio = cfg.block_size // cfg.compress_stride
  overlap = cfg.compress_window // cfg.compress_stride
  if (cfg.block_size % cfg.compress_stride or ratio & (ratio - 1)
      or cfg.compress_window % cfg.compress_stride or overlap > ratio + 1):
    raise ValueError(f"{fn}: the kernels need block_size / compress_stride a power of two and "
                     f"compress_window a multiple of compress_stride, at most block_size + "
                     f"compress_stride; got block_size={cfg.block_size}, compress_window="
                     f"{cfg.compress_window}, compress_stride={cfg.compress_stride}")
  if block_windows < 16 or block_windows & (block_windows - 1) or block_windows % ratio:
    raise ValueError(f"{fn}: block_windows must be a power of two >= 16 and a multiple of "
                     f"{ratio}, got {block_windows}")
  heads, d = q.shape[2], q.shape[3]
  kv_heads = kc.shape[2]
  group = heads // kv_heads
  rows = max(16, next_power_of_2(group))
  qg = q[:, 0].reshape(b, kv_heads, group, d).astype(kc.dtype)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  n_blocks = -(-kv_len // cfg.block_size)
  tile_blocks = block_windows // ratio
  n_out = max(next_power_of_2(n_blocks), tile_blocks, min_out)
  tiles = n_out // tile_blocks
  splits = default_splits(b, kv_heads, tiles) if splits is None else splits
  if (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1
      or splits & (splits - 1)):
    raise ValueError(f"{fn}: splits must be None or a power of two (the Triton lowering loads "
                     f"the [splits, rows] partials as one block), got {splits!r}")

  if segment_ids is None:
    q_seg = jnp.zeros((b,), jnp.int32)
    wseg = doc = None
    coarse = None if not cfg.approximate_lse else (kc_coarse, None)
  else:
    q_seg = segment_ids[:, 0].astype(jnp.int32)
    kv_seg = kv_segment_ids.astype(jnp.int32)
    wseg = _window_segments(kv_seg, kc.shape[1], cfg.compress_window, cfg.compress_stride)
    coarse = None
    if cfg.approximate_lse:
      coarse = (kc_coarse, _window_segments(kv_seg, kc_coarse.shape[1], cfg.lse_window,
                                            cfg.lse_stride))
    exists = jnp.arange(n_blocks * cfg.block_size) < kv_len
    blocks = jnp.pad(kv_seg, ((0, 0), (0, n_blocks * cfg.block_size - kv_len)))
    same_doc = (blocks == q_seg[:, None]) & exists
    doc = jnp.any(same_doc.reshape(b, n_blocks, cfg.block_size), axis=-1)
    doc = jnp.pad(doc.astype(jnp.int32), ((0, 0), (0, n_out - n_blocks)))
  pos = jnp.stack([q_start, q_seg], axis=-1)
  options = dict(heads=group, tile=block_windows, splits=int(splits),
                 window=cfg.compress_window, stride=cfg.compress_stride,
                 lse_window=cfg.lse_window, lse_stride=cfg.lse_stride,
                 block_size=cfg.block_size, init_blocks=cfg.init_blocks,
                 local_blocks=cfg.local_blocks, n_out=n_out,
                 interpret=implementation == "interpret")
  return (pos, qg, kc, coarse, wseg, doc), options, kw


def decode_selection_keys(q, kc, cfg: reference.InfLLMv2Config, *, kv_len: int, q_start,
                          kc_coarse=None, segment_ids=None, kv_segment_ids=None,
                          implementation: str = "pallas", block_windows: int = 64,
                          splits: int | None = None, num_warps: int = 4, num_stages: int = 2):
  """See the module docstring. q [b, 1, heads, d]; kc / kc_coarse as `compressed_block_scores`
  takes them (num_windows(kv_len, ...) windows); q_start [b]; segment_ids [b, 1] with
  kv_segment_ids [b, kv_len], or neither. block_windows: compressed windows per tile (a power
  of two, a multiple of block_size / compress_stride); splits: programs per (row, KV head), a
  power of two (default `default_splits`)."""
  args, options, kw = _kernel_inputs(
      "decode_selection_keys", q, kc, cfg, kv_len=kv_len, q_start=q_start, kc_coarse=kc_coarse,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, implementation=implementation,
      block_windows=block_windows, splits=splits)
  if args is None:
    return reference.decode_selection_keys(q, kc, cfg, **kw)
  keys = decode_keys_kernels(*args, **options, num_warps=num_warps, num_stages=num_stages)
  return keys[:, None]


def select_decode_blocks(q, kc, cfg: reference.InfLLMv2Config, *, kv_len: int, q_start,
                         kc_coarse=None, segment_ids=None, kv_segment_ids=None,
                         implementation: str = "pallas", block_windows: int = 64,
                         splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
                         scores_num_warps: int | None = None):
  """`sparsejax.ops.infllmv2.select_decode_blocks` (the semantics) from the two decode kernels,
  the scores kernel selecting too (its last split per row, `_select_blocks`): (block_idx int32,
  block_valid bool) [b, 1, kv_heads, width], width >= decode_width(cfg, kv_len): the
  reference's slots, then -1 (width is twice a power of two, so that no XLA op cuts the
  kernel's rows). Arguments as `decode_selection_keys`; scores_num_warps: the scores kernel's
  warps (default num_warps)."""
  width = reference.decode_width(cfg, kv_len)
  slots = max(16, next_power_of_2(width))
  args, options, kw = _kernel_inputs(
      "select_decode_blocks", q, kc, cfg, kv_len=kv_len, q_start=q_start, kc_coarse=kc_coarse,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, implementation=implementation,
      block_windows=block_windows, splits=splits, min_out=2 * slots)
  if args is None:
    return reference.select_decode_blocks(q, kc, cfg, **kw)
  _, idx = decode_keys_kernels(*args, **options, select=(cfg.topk, slots, cfg.dense_len),
                               num_warps=num_warps, num_stages=num_stages,
                               scores_num_warps=scores_num_warps)
  idx = idx[:, None]
  return idx, idx >= 0


def select_and_attend_forced(q, k, v, kc, cfg: reference.InfLLMv2Config, *, q_start,
                             forced_splits: int, kc_coarse=None, segment_ids=None,
                             kv_segment_ids=None, implementation: str = "pallas",
                             block_windows: int = 64, splits: int | None = None,
                             num_warps: int = 4, num_stages: int = 2,
                             scores_num_warps: int | None = None):
  """`select_decode_blocks` on the cache k, v [b, kv_len, kv_heads, d] (kv_len = k.shape[1]),
  with forced_splits (>= 1) more programs in the scores kernel that attend each row's forced
  blocks meanwhile (`_attend_forced`; InfLLMv2Config keeps them within topk): (block_idx
  int32 [b, 1, kv_heads, width], (out float32 [b, kv_heads, forced_splits * rows, d], lse
  float32 [b, kv_heads, forced_splits * rows])). A selecting row's block_idx lists its unforced
  winners only (then -1), a row below dense_len every block up to its own (its partials see
  nothing); the partials are sparse_decode's extra_partials. Kernels only (implementation
  "pallas" or "interpret"); the other arguments as `select_decode_blocks`."""
  fn = "select_and_attend_forced"
  if implementation == "reference":
    raise ValueError(f"{fn}: needs a kernel implementation ('pallas' or 'interpret')")
  if forced_splits < 1:
    raise ValueError(f"{fn}: forced_splits must be >= 1, got {forced_splits}")
  if k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"{fn}: k and v must be [batch, kv_len, kv_heads, head_dim] alike, got "
                     f"k{k.shape} v{v.shape}")
  kv_len = k.shape[1]
  slots = max(16, next_power_of_2(reference.decode_width(cfg, kv_len)))
  args, options, _ = _kernel_inputs(
      fn, q, kc, cfg, kv_len=kv_len, q_start=q_start, kc_coarse=kc_coarse,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, implementation=implementation,
      block_windows=block_windows, splits=splits, min_out=2 * slots)
  kv_seg = None if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
  _, idx, out, lse = decode_keys_kernels(
      *args, **options, select=(cfg.topk, slots, cfg.dense_len), num_warps=num_warps,
      num_stages=num_stages, scores_num_warps=scores_num_warps, forced=(k, v, kv_seg),
      forced_splits=int(forced_splits))
  return idx[:, None], (out, lse)
