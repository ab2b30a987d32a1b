"""The public ops: `top_blocks` and `select_blocks` of sparsejax.ops.infllmv2 (the semantics),
with an `implementation=` switch.

  top_blocks(key, topk, implementation="pallas" | "interpret" | "reference")
      -> (block_idx int32, block_valid bool) [..., topk]
  select_blocks(scores, cfg, *, q_len, kv_len, q_start=None, segment_ids=None,
                kv_segment_ids=None, implementation=...) -> the same, from block scores

The ranking keys (forced +inf, ineligible -inf) are XLA's elementwise work; the kernel replaces
lax.top_k and the sort of the chosen indices (kernel.py says how and why).
"""
import functools

import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_topk.kernel import topk_indices
from pallas_kernels.sparse_attention.index import next_power_of_2
from sparsejax.ops import infllmv2 as reference

IMPLEMENTATIONS = ("pallas", "interpret", "reference")


def merge_tail(key, tail):
  """The block keys the scoring kernel leaves to its reader: key[..., j] raised to
  tail[..., j - 1] wherever it is not -inf (a block also pools the last windows of the block
  before it; +inf stays, an ineligible -inf stays). key, tail [..., n_blocks] float32."""
  prev = jnp.pad(tail[..., :-1], [(0, 0)] * (tail.ndim - 1) + [(1, 0)])
  return jnp.where(key == -jnp.inf, key, jnp.maximum(key, prev))


def default_num_warps(rows: int) -> int:
  """Warps per row of the top-k kernel. Measured on the H100 (2026-12-07): 4 is the fastest at
  prefill sizes (256k rows at 128k; experiments/results/bench_topk.md); a decode step's 16 rows
  run one latency-bound program each and took 9.8 us at 4 warps, 8.3 at 8 or 16, 14.1 at 2
  (experiments/results/decode_sweep_1207e.md)."""
  return 8 if rows <= 1024 else 4


def top_blocks(key, topk: int, *, implementation: str = "pallas", num_warps: int | None = None,
               tail=None):
  """See the module docstring; key [..., n_blocks] float32 without NaN. tail: None, or the
  scoring kernel's tail maxima (like key): the keys are `merge_tail(key, tail)`, which the
  kernel forms as it loads them. num_warps: per row (default `default_num_warps`)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"top_blocks: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if not isinstance(topk, (int, np.integer)) or isinstance(topk, bool) or topk < 1:
    raise ValueError(f"top_blocks: topk must be a positive int, got {topk!r}")
  if key.ndim < 1 or key.dtype != jnp.float32:
    raise ValueError(f"top_blocks: key must be a float32 array [..., n_blocks], got "
                     f"{key.dtype} {key.shape}")
  if tail is not None and (tail.shape != key.shape or tail.dtype != jnp.float32):
    raise ValueError(f"top_blocks: tail must be float32 like key {key.shape}, got {tail.dtype} "
                     f"{tail.shape}")
  if implementation == "reference":
    return reference.top_blocks(key if tail is None else merge_tail(key, tail), topk)
  *lead, n_blocks = key.shape
  width = max(16, next_power_of_2(n_blocks))
  pad = ((0, 0), (0, width - n_blocks))
  flat = jnp.pad(key.reshape(-1, n_blocks), pad, constant_values=-jnp.inf)
  flat_tail = None if tail is None else jnp.pad(tail.reshape(-1, n_blocks), pad)
  if num_warps is None:
    num_warps = default_num_warps(flat.shape[0])
  idx = topk_indices(flat, flat_tail, topk=int(topk), interpret=implementation == "interpret",
                     num_warps=num_warps)[:, :topk].reshape(*lead, topk)
  return idx, idx >= 0


def select_blocks(scores, cfg, *, q_len: int, kv_len: int, q_start=None, segment_ids=None,
                  kv_segment_ids=None, implementation: str = "pallas"):
  """`sparsejax.ops.infllmv2.select_blocks` with the top-k by `implementation`."""
  return reference.select_blocks(scores, cfg, q_len=q_len, kv_len=kv_len, q_start=q_start,
                                 segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                 top_blocks_fn=top_blocks_fn(implementation))


def top_blocks_fn(implementation: str, num_warps: int | None = None):
  """`top_blocks` at `implementation`, as the reference's `top_blocks_fn` argument."""
  return functools.partial(top_blocks, implementation=implementation, num_warps=num_warps)
