"""Decode benchmark on the GPU: one query token per row against a long KV cache, InfLLM-V2 sparse
decode (block selection from the cached compressed keys + the block-sparse decode kernel)
against cuDNN dense decode, and the bytes floor.

  python -m experiments.bench_decode --seq_lens=32768,65536,131072 --batch=8 \
      --out=experiments/results/bench_decode

Shapes: batch 8, 32 query heads, 2 KV heads (GQA 16), head dim 128, bf16, every row's cache full
(the query is the last token). Two selections: "shipped" (InfLLMv2Config's default: topk 96 =
init 1 + local 32 + 63 others, MiniCPM4's released setting) and "issue" (64 blocks = init 1 +
local 32 + 31 others). Blocks of 64, compressed keys 32/16, dense_len 8192; the selection's
normaliser exact, or with --approximate_lse over the coarse 128/64 keys.

Timed (median of --iters after two warm-up calls; inputs are jit arguments):
  sparsejax_ms    the whole decode attention as the InfLLM-V2 layer runs it: scoring from the
                  cached compressed keys, top-k selection, the kernel and its split combine
                  (with the cache's segment ids, as the model passes them; --segments=false
                  drops them)
  selection_ms    scoring + selection alone (pallas_kernels/block_scores' two decode kernels, or
                  with --nokeys_kernel XLA: einsum, softmax, group sum, max-pool; the top-k by
                  the sort-free kernel, or XLA's top_k and sort with --notopk_kernel)
  attention_ms    the kernel + combine alone, given the selection
  cudnn_dense_ms  jax.nn.dot_product_attention(implementation="cudnn") of the one-token query
                  against the full cache (XLA when cuDNN refuses; `dense_impl` says which)
  floor_ms        bytes that must be read (compressed keys + the selected blocks' k and v) at
                  3.35 TB/s (H100 SXM HBM3 peak)
The `step_*` columns time the same calls the way a model's decode step runs them: `--layers`
distinct caches (as many layers), each call's query depending on the previous call's output,
`--layers` x `--step_reps` calls chained in ONE jitted program, `--step_programs` programs
dispatched back to back per sample, the time divided by the calls. Host dispatch (paid once per
program, and hidden behind the previous program's run from the second on) and a cache staying
in L2 between calls (the layers' caches together exceed the H100's 50 MB L2) both drop out; the
wall-clock columns above pay a dispatch per call, which at a few hundred microseconds is not
small. (Until 2026-12-07 each sample was one program: its ~0.5 ms dispatch, spread over 16
calls, added ~30 us to every in-step call, sparse and dense alike.) The positions and segment
ids are passed once for all the layers, as a model's layers share its cache's: XLA computes the
selection's segment arrays once a program, as in the model (until 2026-12-07 every call paid
them).
  step_sparsejax_ms, step_cudnn_dense_ms, step_speedup_vs_cudnn_dense
Each row also records the kernel's max abs error against its jnp reference (not timed).
`--quick` runs a tiny CPU smoke version (the kernel in interpret mode) in seconds.
"""
from absl import app, flags

from experiments.decode_timing import decode_rows, write_results

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "65536", "131072"], "Cache lengths.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows (one query token each).")
_CONFIGS = flags.DEFINE_list("configs", ["shipped", "issue"], "Selections to time.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed repetitions (median).")
_NUM_SPLITS = flags.DEFINE_integer("num_splits", 0, "Kernel programs per (row, KV head); 0 = "
                                   "default_num_splits.")
_NUM_WARPS = flags.DEFINE_integer("num_warps", 4, "Triton warps per kernel program.")
_NUM_STAGES = flags.DEFINE_integer("num_stages", 3, "Triton software-pipelining stages of "
                                   "sparse_decode (3: its default).")
_SEGMENTS = flags.DEFINE_bool("segments", True, "Pass segment ids as the model does.")
_TOPK_KERNEL = flags.DEFINE_bool("topk_kernel", True, "Select with the sort-free top-k kernel "
                                 "(pallas_kernels/block_topk), as the layer does; false: XLA's "
                                 "top_k and sort.")
_TOPK_WARPS = flags.DEFINE_integer(
    "topk_num_warps", 0, "Warps per row of the top-k kernel (0: block_topk's default_num_warps, "
    "as the layer runs it; 8 for a decode step's batch x KV heads rows).")
_KEYS_KERNEL = flags.DEFINE_bool(
    "keys_kernel", True, "Compute the selection keys with pallas_kernels/block_scores' decode "
    "kernels, as the layer does by default (attention_options decode_keys_kernel); false: XLA.")
_KEYS_SPLITS = flags.DEFINE_integer(
    "keys_splits", 0, "With --keys_kernel: programs per (row, KV head) of the decode-key kernels, "
    "a power of two; 0 = their default_splits (about 512 programs in all).")
_FUSED_SELECT = flags.DEFINE_bool(
    "fused_select", True, "With both --keys_kernel and --topk_kernel: the top-k runs in the "
    "decode scores kernel's last split (block_scores.select_decode_blocks), as the layer does; "
    "false: the separate top-k kernel.")
_APPROX = flags.DEFINE_bool(
    "approximate_lse", False, "Normalise the selection scores over the coarse compressed keys "
    "(InfLLMv2Config.approximate_lse, as bench_attention's prefill rows do by default; the cache "
    "then keeps both): a quarter of the normaliser's reads.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny CPU smoke run (interpret mode).")
_LAYERS = flags.DEFINE_integer("layers", 4, "Distinct caches in the in-step timing (0: skip it).")
_STEP_REPS = flags.DEFINE_integer("step_reps", 4, "Passes over the layers in the in-step timing.")
_STEP_PROGRAMS = flags.DEFINE_integer(
    "step_programs", 4, "In-step programs dispatched back to back per timed sample (1: each "
    "pays the host's dispatch, ~0.5 ms at 128k, spread over its calls).")
_OUT = flags.DEFINE_string("out", "", "Output path stem (.json and .md).")
_PROFILE = flags.DEFINE_bool("profile", False, "Also trace the in-step programs (sparse and dense) "
                             "and write per-kernel device times to <out>_profile.md and the rows.")

def main(argv):
  del argv
  quick = _QUICK.value
  rows = decode_rows(
      (256,) if quick else _SEQ_LENS.value, batch=2 if quick else _BATCH.value,
      configs=_CONFIGS.value, iters=1 if quick else _ITERS.value,
      num_splits=_NUM_SPLITS.value or None, num_warps=_NUM_WARPS.value,
      num_stages=_NUM_STAGES.value, segments=_SEGMENTS.value, layers=_LAYERS.value,
      step_reps=_STEP_REPS.value, step_programs=_STEP_PROGRAMS.value,
      topk_kernel=_TOPK_KERNEL.value,
      keys_kernel=_KEYS_KERNEL.value, keys_splits=_KEYS_SPLITS.value or None,
      approximate_lse=_APPROX.value, topk_num_warps=_TOPK_WARPS.value or None,
      fused_select=_FUSED_SELECT.value, profile=_PROFILE.value,
      quick=quick)
  if _OUT.value:
    write_results(rows, _OUT.value, quick=quick)


if __name__ == "__main__":
  app.run(main)
