"""The public op: one InfLLM-V2 decode step (one query token per row) against a KV cache with
its compressed keys, from the kernels of two families.

  infllmv2_decode(q, k, v, kc, cfg, *, q_start, kc_coarse=None, segment_ids=None,
                  kv_segment_ids=None, implementation="pallas" | "interpret" | "reference",
                  forced_splits=None, ...) -> [b, 1, heads, d] in q.dtype

The semantics are `sparsejax.ops.infllmv2.infllmv2_decode` (the reference): select each row's
blocks from the cached compressed keys, then attend them. Three launches: block_scores' decode
logits kernel, its scores kernel (which also selects: the last split of each row runs the
top-k), and sparse_decode.

Why the forced blocks go with the scores kernel: InfLLM-V2 forces the init block and the local
window (1 + 32 of the 64 blocks a 128k row attends) whatever the scores, so their attention does
not wait for the selection. The scores kernel's tail is one program per row searching its
top-k (~10 us at batch 8, 128k, on 16 of the H100's 132 SMs) while the memory system idles:
forced_splits more programs per (row, KV head) attend the forced blocks then, and write partial
softmaxes that sparse_decode merges with its own; its selection lists only the unforced winners
(the top topk - #forced finite keys), so sparse_decode reads half the bytes it did
(experiments/results/decode_probe_1207g.md: its time follows its live slots). Measured on the
H100 at batch 8, 128k (experiments/results/decode_sweep_1207g_forced.md, one process):
sparse_decode 20.9 -> 15.7 us, the scores kernel 17.4 -> 20.4 (the forced programs outlast its
top-k), 57.5 -> 55.4 us of kernels a step, 62.2 -> 58.1 in-step. A row below dense_len attends
every block in sparse_decode, its forced partial empty (InfLLMv2Config keeps init_blocks +
local_blocks <= topk, so a selecting row's forced blocks always win). Without forced blocks, or
with forced_splits=0, the step runs the plain order: select, then attend every selected block.
"""
import jax.numpy as jnp

from pallas_kernels.block_scores.decode import select_and_attend_forced, select_decode_blocks
from pallas_kernels.sparse_decode import sparse_decode
from sparsejax.ops import infllmv2 as reference

IMPLEMENTATIONS = ("pallas", "interpret", "reference")


def resolve_forced_splits(batch: int, kv_heads: int, cfg: reference.InfLLMv2Config,
                          forced_splits: int | None = None) -> int:
  """The forced-block programs per (row, KV head) that infllmv2_decode launches for the knob
  forced_splits: as given when an int >= 0 (0: none); for None, about 128 programs in all, as
  sparse_decode's splits, at least one forced block each (InfLLMv2Config forces at least the
  local block)."""
  if forced_splits is not None and (not isinstance(forced_splits, int)
                                    or isinstance(forced_splits, bool) or forced_splits < 0):
    raise ValueError(f"infllmv2_decode: forced_splits must be None or an int >= 0, got "
                     f"{forced_splits!r}")
  if forced_splits is None:
    forced_blocks = cfg.init_blocks + cfg.local_blocks
    return int(max(1, min(forced_blocks, 128 // max(1, batch * kv_heads))))
  return forced_splits


def infllmv2_decode(q, k, v, kc, cfg: reference.InfLLMv2Config, *, q_start, kc_coarse=None,
                    segment_ids=None, kv_segment_ids=None, implementation: str = "pallas",
                    forced_splits: int | None = None, num_splits: int | None = None,
                    num_warps: int = 4, num_stages: int = 3, keys_splits: int | None = None,
                    keys_num_warps: int = 4, keys_num_stages: int = 2, block_windows: int = 64,
                    scores_num_warps: int | None = None, decode_kernel: str = "triton"):
  """See the module docstring; arguments as the reference's (q [b, 1, heads, d] at q_start [b];
  k, v [b, kv_len, kv_heads, d] with keys [0, q_start] filled; kc / kc_coarse the cached
  compressed keys; segment_ids [b, 1] with kv_segment_ids [b, kv_len], or neither). Launch
  knobs: forced_splits (forced-block programs per row and KV head, `resolve_forced_splits`;
  0: none), num_splits / num_warps / num_stages / decode_kernel (sparse_decode's: its `kernel`,
  "triton" or "mosaic"), keys_splits / keys_num_warps /
  keys_num_stages / block_windows / scores_num_warps (the decode-key kernels', as
  block_scores.select_decode_blocks takes them)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"infllmv2_decode: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  kw = dict(q_start=q_start, kc_coarse=kc_coarse, segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids)
  if implementation == "reference":
    return reference.infllmv2_decode(q, k, v, kc, cfg, **kw)
  b = q.shape[0]
  forced_splits = resolve_forced_splits(b, k.shape[-2], cfg, forced_splits)
  knobs = dict(implementation=implementation, block_windows=block_windows, splits=keys_splits,
               num_warps=keys_num_warps, num_stages=keys_num_stages)
  if forced_splits:
    idx, extra = select_and_attend_forced(q, k, v, kc, cfg, forced_splits=forced_splits, **kw,
                                          **knobs, scores_num_warps=scores_num_warps)
  else:
    idx, _ = select_decode_blocks(q, kc, cfg, kv_len=k.shape[1], **kw, **knobs,
                                  scores_num_warps=scores_num_warps)
    extra = None
  lengths = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32).reshape(-1), (b,)) + 1
  out, _ = sparse_decode(q[:, 0], k, v, idx[:, 0], None, lengths,
                         block_size=cfg.block_size,
                         q_segment_ids=None if segment_ids is None else segment_ids[:, 0],
                         kv_segment_ids=kv_segment_ids, implementation=implementation,
                         num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                         extra_partials=extra, kernel=decode_kernel)
  return out[:, None]
