"""The public op: block-sparse attention of one query token per row to a KV cache.

  sparse_decode(q, k, v, block_idx, block_valid, lengths, *, block_size=64, q_segment_ids=None,
                kv_segment_ids=None, key_bias=None,
                implementation="pallas" | "interpret" | "reference",
                num_splits=None, kernel="triton" | "mosaic")
      -> (out [b, heads, d] in q.dtype, lse [b, heads] float32)

q [b, heads, d]: each row's query token; k, v [b, capacity, kv_heads, d]: the cache (heads %
kv_heads == 0; query head n reads KV head n // (heads // kv_heads)); block_idx / block_valid
[b, kv_heads, slots]: the distinct key blocks (of `block_size` tokens) each row and KV head may
see, e.g. InfLLM-V2's selection (`sparsejax.ops.infllmv2.select_decode_blocks`); block_valid
may be None when every dead slot's index is negative (as select_decode_blocks returns them):
one XLA op less before the kernel; lengths [b]:
keys [0, lengths[b]) are filled, later slots are never read into the result (the query at
position lengths - 1 sees itself and everything before it). Optional segment ids (q_segment_ids
[b], kv_segment_ids [b, capacity]) restrict every row to keys of its query's segment. A query
that sees no key gets zeros and lse -inf. lse is the natural-log logsumexp of q.k / sqrt(d)
(+ key_bias: None or float [b, capacity, kv_heads], NOSA's eviction scores, added to the
scaled logits of the KV head's query heads; the Triton kernel only). Forward only: decoding needs no gradient.

The kernel visits a row's slots up to its last valid one (valid slots first, as selections come,
costs nothing for the dead tail) and splits them over `num_splits` programs per (row, KV head);
the last split of each (row, KV head) to finish merges the partial softmaxes. Two kernels:
"triton" (kernel.py, the default) and "mosaic" (kernel_mosaic.py: Hopper, TMA loads of several
blocks in flight). The Mosaic kernel is correct on the GPU but slower (H100, 31 blocks of 64 at
batch 8: 11.5 against 9.5 us warm, 16.2 against 15.5 cold; experiments/results/
decode_mosaic_1207j.md), so it stays opt-in.
"""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention.index import next_power_of_2
from pallas_kernels.sparse_decode.kernel import sparse_decode_kernel
from pallas_kernels.sparse_decode.kernel_mosaic import ROWS as MOSAIC_ROWS
from pallas_kernels.sparse_decode.kernel_mosaic import sparse_decode_mosaic
from pallas_kernels.sparse_decode.reference import sparse_decode_reference
from sparsejax.ops.infllmv2 import check_key_bias

IMPLEMENTATIONS = ("pallas", "interpret", "reference")
KERNELS = ("triton", "mosaic")


def default_num_splits(batch: int, kv_heads: int, slots: int) -> int:
  """Splits per (row, KV head): about 128 programs in all (an H100 has 132 SMs), at least one
  block slot each."""
  return int(max(1, min(slots, 128 // max(1, batch * kv_heads))))


def _check(q, k, v, block_idx, block_valid, lengths, q_segment_ids, kv_segment_ids, block_size,
           implementation, num_splits, kernel="triton", key_bias=None):
  fn = "sparse_decode"
  check_key_bias(fn, key_bias, k, "capacity")
  if key_bias is not None:
    if kernel == "mosaic" and implementation != "reference":
      raise ValueError(f"{fn}: kernel='mosaic' takes no key_bias yet; use kernel='triton'")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{fn}: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if kernel not in KERNELS:
    raise ValueError(f"{fn}: kernel must be one of {KERNELS}, got {kernel!r}")
  if q.ndim != 3:
    raise ValueError(f"{fn}: q must be [batch, heads, head_dim] (one token per row), got {q.shape}")
  if k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"{fn}: k and v must be [batch, capacity, kv_heads, head_dim] alike, got "
                     f"k{k.shape} v{v.shape}")
  if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
    raise ValueError(f"{fn}: q{q.shape} and k{k.shape} must agree on batch and head_dim")
  if q.shape[1] % k.shape[2]:
    raise ValueError(f"{fn}: heads={q.shape[1]} must be a multiple of kv_heads={k.shape[2]}")
  d = q.shape[2]
  if d < 16 or d & (d - 1):
    raise ValueError(f"{fn}: head_dim must be a power of two >= 16 (tl.dot tiles), got {d}")
  if (not isinstance(block_size, (int, np.integer)) or block_size < 16
      or block_size & (block_size - 1)):
    raise ValueError(f"{fn}: block_size must be a power of two >= 16, got {block_size!r}")
  want = (q.shape[0], k.shape[2])
  if block_valid is None:
    block_valid = jax.ShapeDtypeStruct(block_idx.shape, jnp.bool_)  # for the checks below
  if block_idx.ndim != 3 or block_idx.shape[:2] != want or block_valid.shape != block_idx.shape:
    raise ValueError(f"{fn}: block_idx and block_valid must be [batch, kv_heads, slots] = "
                     f"{want + ('slots',)}, got {block_idx.shape} and {block_valid.shape}")
  if not jnp.issubdtype(block_idx.dtype, jnp.integer) or block_valid.dtype != jnp.bool_:
    raise ValueError(f"{fn}: block_idx must be integer and block_valid bool or None, got "
                     f"{block_idx.dtype} and {block_valid.dtype}")
  if (jnp.shape(lengths) != (q.shape[0],)
      or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer)):
    raise ValueError(f"{fn}: lengths must be an int [batch={q.shape[0]}] array, got "
                     f"{jnp.shape(lengths)} {jnp.result_type(lengths)}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError(f"{fn}: pass both q_segment_ids and kv_segment_ids, or neither")
  if q_segment_ids is not None and (q_segment_ids.shape != (q.shape[0],)
                                    or kv_segment_ids.shape != k.shape[:2]):
    raise ValueError(f"{fn}: q_segment_ids must be [batch] = {(q.shape[0],)} and kv_segment_ids "
                     f"[batch, capacity] = {k.shape[:2]}, got {q_segment_ids.shape} and "
                     f"{kv_segment_ids.shape}")
  if num_splits is not None and (not isinstance(num_splits, (int, np.integer))
                                 or isinstance(num_splits, bool) or num_splits < 1):
    raise ValueError(f"{fn}: num_splits must be None or a positive int, got {num_splits!r}")
  if kernel == "mosaic" and implementation != "reference":
    group = q.shape[1] // k.shape[2]
    if (group > 64 or d % 64 or block_size % 64 or k.shape[1] % 8
        or q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype):
      raise ValueError(f"{fn}: kernel='mosaic' takes at most 64 query heads per KV head, "
                       f"head_dim and block_size multiples of 64, a cache capacity that is a "
                       f"multiple of 8 and bf16/f16 q, k, v; got group={group}, head_dim={d}, "
                       f"block_size={block_size}, capacity={k.shape[1]}, {q.dtype}/{k.dtype} "
                       f"(kernel='triton' takes all of these)")


def sparse_decode(q, k, v, block_idx, block_valid, lengths, *, block_size: int = 64,
                  q_segment_ids=None, kv_segment_ids=None, implementation: str = "pallas",
                  num_splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
                  poison_outputs: bool = False, extra_partials=None, kernel: str = "triton",
                  key_bias=None):
  """See the module docstring. num_splits: programs per (row, KV head) (default
  `default_num_splits`); poison_outputs: run the kernel on NaN-filled output buffers (a test of
  full coverage); extra_partials: None, or partial softmaxes of the same rows over other keys
  (kernel.sparse_decode_kernel's `extra`), merged into the result (kernels only). kernel:
  "triton" (kernel.py; num_warps and num_stages its launch knobs) or "mosaic" (kernel_mosaic.py,
  Hopper; num_stages the blocks whose loads are in flight at once, num_splits rounded up to a
  multiple of 64 / rows)."""
  _check(q, k, v, block_idx, block_valid, lengths, q_segment_ids, kv_segment_ids, block_size,
         implementation, num_splits, kernel, key_bias)
  lengths = lengths.astype(jnp.int32)
  if implementation == "reference":
    if extra_partials is not None:
      raise ValueError("sparse_decode: extra_partials needs a kernel implementation "
                       "('pallas' or 'interpret')")
    return sparse_decode_reference(q, k, v, block_idx, block_valid, lengths, q_segment_ids,
                                   kv_segment_ids, key_bias, block_size=block_size)
  batch, heads, d = q.shape
  capacity, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  slots = block_idx.shape[-1]
  num_splits = default_num_splits(batch, kv_heads, slots) if num_splits is None else num_splits
  if capacity < block_size:  # a tiny cache: pad it to one whole block (the kernel loads blocks)
    pad = ((0, 0), (0, block_size - capacity), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    if kv_segment_ids is not None:
      kv_segment_ids = jnp.pad(kv_segment_ids, ((0, 0), (0, block_size - capacity)))
    if key_bias is not None:
      key_bias = jnp.pad(key_bias, ((0, 0), (0, block_size - capacity), (0, 0)))
    lengths = jnp.minimum(lengths, capacity)

  # Dead slots as -1 (the selections' own convention), padded to a power of two of slots.
  idx = block_idx.astype(jnp.int32)
  if block_valid is not None:
    idx = jnp.where(block_valid, idx, -1)
  width = next_power_of_2(slots)
  if width != slots:
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, width - slots)), constant_values=-1)
  q_seg = None if q_segment_ids is None else q_segment_ids.astype(jnp.int32)

  rows = max(16, next_power_of_2(group))  # tl.dot needs M >= 16: pad the group's rows
  qg = jnp.pad(q.reshape(batch, kv_heads, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  kv_seg = None if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
  if kernel == "mosaic":
    # Its slot row is one vector load (a multiple of 128 wide); a 64-row tile of partials holds
    # 64 / rows splits.
    if width % 128:
      idx = jnp.pad(idx, ((0, 0), (0, 0), (0, 128 - width % 128)), constant_values=-1)
    tiles = MOSAIC_ROWS // rows
    if extra_partials is not None and extra_partials[1].shape[-1] % (tiles * rows):
      # Whole tiles of extra parts too: empty parts (lse -inf) merge as nothing.
      missing = tiles * rows - extra_partials[1].shape[-1] % (tiles * rows)
      o_extra, lse_extra = extra_partials
      extra_partials = (jnp.pad(o_extra, ((0, 0), (0, 0), (0, missing), (0, 0))),
                        jnp.pad(lse_extra, ((0, 0), (0, 0), (0, missing)),
                                constant_values=-jnp.inf))
    out, lse = sparse_decode_mosaic(idx, lengths, qg, k, v, extra_partials, q_seg, kv_seg,
                                    block_k=block_size,
                                    num_splits=-(-int(num_splits) // tiles) * tiles,
                                    stages=num_stages, interpret=implementation == "interpret")
    return (out[:, :, :group].reshape(batch, heads, d),
            lse[:, :, :group].reshape(batch, heads))
  bias = None if key_bias is None else jnp.swapaxes(key_bias.astype(jnp.float32), 1, 2)
  out, lse = sparse_decode_kernel(idx, lengths, q_seg, qg, k, v, kv_seg, extra_partials, bias,
                                  block_k=block_size,
                                  num_splits=int(num_splits),
                                  interpret=implementation == "interpret", num_warps=num_warps,
                                  num_stages=num_stages, poison=poison_outputs)
  return (out[:, :, :group].reshape(batch, heads, d),
          lse[:, :, :group].reshape(batch, heads))

