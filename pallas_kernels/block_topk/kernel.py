"""Top-k block selection per row as a Pallas kernel (Triton lowering), no sort.

XLA's top_k at InfLLM-V2's shapes (128k queries x 2 KV heads = 256k rows of 2048 block keys,
k = 64), followed by the ascending sort of the chosen indices, took 26.6 ms on the H100, a
quarter of the whole forward (experiments/results/bench_attention_grouped.md). Selection needs
neither order: only the set of the k best, listed ascending. So each program finds its rows'
k-th largest key by a radix search and writes the winners in index order.

Cost at 128k (256k rows of 2048 keys, k = 64), counted before any measurement: 2.1 GB of keys
read and 0.27 GB of indices written, 0.7 ms at the H100's 3.35 TB/s; about 80k integer
operations a row (32 counting passes over 2048 keys, two cumsums), 21 G in all, ~1.4 ms at the
ALUs' ~15 T int32 ops/s. XLA's elementwise ranking keys before it read and write 2 GB more. So
a few ms against XLA's 26.6. Measured on the H100 (experiments/results/bench_topk.md): 4.22 ms
against 27.6 for XLA (6.5x) at 128k, 0.56 against 1.72 at 32k. At 128k that is 509 GB/s of keys,
so the 32 counting passes (compute), not the bytes, set its time. Stopping the passes once
exactly k keys are at or above the threshold took 128k from 4.0 to 3.26 ms (2026-12-07,
bench_topk_1207d.md); a decode step's 16 rows stayed at ~9.5 us (latency-bound). Counting 2^b
candidate thresholds a pass (32 / b passes, fewer barriers) was slower at every size tried on the
H100 (2026-12-07, experiments/results/decode_one_pass.md): at 128k, 6.6 ms for b = 2 and 11.3 for
b = 4 against 4.0; for a decode step's 16 rows, 20.8 us in-step for b = 4 against 9.4. Again,
with the 2^b candidates counted in one [2^b, width] reduction, for the decode top-k in the
scores kernel's tail (2026-12-07, decode_1207f.md): b = 1 9.7 us, 2 13.4, 4 21.4. The passes'
compares, not their barriers, set the time; the option was removed again. Searching a short row
instead (the finite keys at or above the need-th largest of 2 * slots group maxima, compacted
through a scratch row in L2; two searches of 2 * slots keys, then the whole row's winners) was
slower too (2026-12-07, seventh session, infllmv2_targets.md): the decode tail 17.4 -> 20.3 us,
the top-k at 128k 3.21 -> 5.91 ms, at 32k 0.38 -> 0.66. Two searches' passes cost more than
one's wider counts; it was removed. Ranking the two short rows instead of searching them (one
[2 * slots, 2 * slots] count each, no loop) was slower still: the decode tail 17.4 -> 48.4 us,
128k 3.03 -> 7.13 ms (decode_sweep_1207g_forced.md, bench_topk_1207g_shortlist.md).

Per row:
  1. Keys become int32 whose signed order is the float order (flip the magnitude bits of the
     negatives; -0.0 is first made +0.0 so that equal keys have equal bits).
  2. need = min(k, #keys > -inf). The need-th largest key T is built bit by bit from the top,
     one count per bit: at most 32 counts over the row, fewer when a prefix of T already has
     exactly `need` keys at or above it (the loop stops there).
  3. Winners: every key > T, then the lowest-indexed keys == T until there are `need`. This is
     lax.top_k's tie rule.
  4. Winner i goes to output slot (number of winners before i), which is a cumsum; the losers
     follow as -1, each in its own slot. It is one store with no two lanes on a kept address.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_INT_MIN = np.int32(np.iinfo(np.int32).min)
_MAGNITUDE = np.int32(0x7FFFFFFF)


def _sortable(x):
  """float32 -> int32 with the same order (signed compare); -0.0 and +0.0 both map to 0."""
  x = jnp.where(x == 0.0, 0.0, x)
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(bits < 0, bits ^ _MAGNITUDE, bits)


def select_row(key, topk: int, slots: int):
  """One row's top-k as a scatter: (target, value) int32 [width] such that storing value at
  target into a row of 2 * slots (slots >= topk, a power of two, <= width) leaves in [0, slots)
  the min(topk, #keys > -inf) best columns ascending, then -1; it writes only -1 to [slots,
  2 * slots), all of it when width >= 2 * slots. key float32 [width] without NaN (steps 1-4 of
  the module docstring)."""
  v = _sortable(key)
  neg_inf = _sortable(jnp.float32(-jnp.inf))
  eligible = v > neg_inf
  need = jnp.minimum(jnp.sum(eligible.astype(jnp.int32)), topk)

  # The need-th largest key, built from the top bit down in the unsigned image w = v ^ INT_MIN
  # (whose unsigned order is the signed order of v): keep a bit when at least `need` keys are
  # >= the candidate. Stop as soon as exactly `need` keys are >= the threshold so far: they are
  # the winners, and with that threshold the tie rule below keeps all of them, so the result is
  # the 32-bit search's. Keys that differ in their top bits stop it early (a decode row of
  # 2048 scores within ~12-16 bits); only ties at the need-th key run all 32 counts.
  def not_found(state):
    i, _, count = state
    return (i < 32) & (count != need)

  def bit_step(state):
    i, t_w, count_t = state
    cand_w = t_w | jnp.left_shift(jnp.int32(1), 31 - i)
    count = jnp.sum((v >= (cand_w ^ _INT_MIN)).astype(jnp.int32))
    keep = count >= need
    return i + 1, jnp.where(keep, cand_w, t_w), jnp.where(keep, count, count_t)

  start = (jnp.int32(0), jnp.int32(0), jnp.int32(v.shape[0]))  # every key is >= INT_MIN
  threshold = jax.lax.while_loop(not_found, bit_step, start)[1] ^ _INT_MIN
  above = (v > threshold) & eligible
  ties = (v == threshold) & eligible
  room = need - jnp.sum(above.astype(jnp.int32))
  chosen = above | (ties & (jnp.cumsum(ties.astype(jnp.int32)) <= room))
  # A stable partition: chosen columns to slots 0.. need - 1 in index order, the others (as -1)
  # after them, each column to its own slot (width >= slots: they cover [need, slots)). Targets
  # past the kept slots fold into the second half of the row: lanes may collide there, never in
  # the kept half, and every lane that lands there writes -1. (No masked store: interpret
  # mode's masked scatter lets a masked lane rewrite a shared address.)
  before = jnp.cumsum(chosen.astype(jnp.int32)) - chosen.astype(jnp.int32)
  columns = jax.lax.iota(jnp.int32, v.shape[0])
  target = jnp.where(chosen, before, need + columns - before)
  target = jnp.where(target < slots, target, slots + (target & (slots - 1)))
  return target, jnp.where(chosen, columns, -1)


def _topk_kernel(key_ref, *refs, topk: int):
  *tail_ref, idx_ref = refs
  key = key_ref[...]                                                # [width]
  if tail_ref:  # merge_tail: each block also pools the tail windows of the block before it
    columns = jax.lax.iota(jnp.int32, key.shape[0])
    prev = plgpu.load(tail_ref[0].at[jnp.maximum(columns - 1, 0)], mask=columns > 0, other=0.0)
    key = jnp.where(key == -jnp.inf, key, jnp.maximum(key, prev))
  target, value = select_row(key, topk, idx_ref.shape[0] // 2)
  plgpu.store(idx_ref.at[target], value)


def index_slots(topk: int) -> int:
  """The kept half of a top-k row: topk rounded up to a power of two, at least 16."""
  return max(16, 1 << (topk - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("topk", "interpret", "num_warps"))
def topk_indices(key, tail=None, *, topk: int, interpret: bool = False, num_warps: int = 4):
  """key float32 [rows, width] (width a power of two >= 16; -inf padding), tail None or like
  key (op.merge_tail: the keys are merged with it first) -> int32 [rows, 2 * slots] (slots =
  `index_slots(topk)`): in the first `slots`, each row's min(topk, #keys > -inf) best columns
  ascending, then -1; the rest is scratch."""
  rows, width = key.shape
  slots = index_slots(topk)
  if width < slots:  # select_row's losers must cover the kept slots: pad with losers
    pad = ((0, 0), (0, slots - width))
    key = jnp.pad(key, pad, constant_values=-jnp.inf)
    tail = None if tail is None else jnp.pad(tail, pad)
  operands = [key] if tail is None else [key, tail]
  return pl.pallas_call(
      functools.partial(_topk_kernel, topk=topk),
      grid=(rows,),
      in_specs=[pl.BlockSpec((None, key.shape[1]), lambda r: (r, 0))] * len(operands),
      out_specs=pl.BlockSpec((None, 2 * slots), lambda r: (r, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, 2 * slots), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="block_topk",
  )(*operands)
