"""Attention benchmark on the GPU: cuDNN dense, the cuDNN sliding window of the same visible-token
count (the floor), and sparsejax's block-sparse kernel given indices (attn_only).

  python -m experiments.bench_attention --seq_lens=32768,65536,131072 --out=experiments/results/bench_attention

Shapes: batch 1, 32 query heads, 2 KV heads, head dim 128, bf16, causal. The selection given to the
kernel is InfLLM-V2-shaped: per query block of 64 tokens, the init block, the local blocks ending at
its own block and random earlier blocks up to `--topk` blocks in all (4096 tokens at 64), the same
for every token of the query block (adjacent tokens share nearly all their blocks in the method).
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.sparse_attention.forward import sparse_attention_forward
from pallas_kernels.sparse_attention.index import next_power_of_2, query_block_unions

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "65536", "131072"], "Sequence lengths.")
_TOPK = flags.DEFINE_integer("topk", 64, "Blocks per query (init + local + others).")
_LOCAL = flags.DEFINE_integer("local_blocks", 32, "Local blocks (2048 tokens).")
_BLOCK = flags.DEFINE_integer("block", 64, "Block size (tokens).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "", "Output path stem (.json and .md).")
_NUM_WARPS = flags.DEFINE_integer("num_warps", 4, "Triton warps per kernel program.")
_NUM_STAGES = flags.DEFINE_integer("num_stages", 2, "Triton software-pipelining stages.")
_PASSES = flags.DEFINE_list("passes", ["attn_only", "fwd_bwd"], "Which rows to measure.")
HEADS, KV_HEADS, DIM = 32, 2, 128


def timeit(fn, *args):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_ITERS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def synthetic_selection(seq, rng):
  block, topk, local = _BLOCK.value, _TOPK.value, _LOCAL.value
  nqb = seq // block
  idx = np.full((nqb, topk), -1, np.int32)
  for qb in range(nqb):
    forced = sorted({0, *range(max(0, qb - local + 1), qb + 1)})
    others = np.setdiff1d(np.arange(qb + 1), forced)
    extra = rng.choice(others, size=min(len(others), topk - len(forced)), replace=False)
    chosen = np.sort(np.r_[forced, extra]).astype(np.int32)
    idx[qb, :len(chosen)] = chosen
  per_token = np.repeat(idx, block, axis=0)                    # [seq, topk]
  return jnp.asarray(np.broadcast_to(per_token[None, :, None, :], (1, seq, KV_HEADS, topk)))


def row(seq, name, t_kernel, t_dense, t_window, flops, **extra):
  """One result row; flops is the work the kernel does (backward counted as 2.5x forward)."""
  return {"seq_len": seq, "batch": 1, "pass": name, "sparsejax_ms": t_kernel,
          "cudnn_dense_ms": t_dense, "floor_ms": t_window,
          "speedup_vs_cudnn_dense": t_dense / t_kernel, "ratio_to_floor": t_kernel / t_window,
          "kernel_tflops": flops / t_kernel / 1e9, "floor_tflops": flops / t_window / 1e9, **extra}


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  rows = []
  for seq in map(int, _SEQ_LENS.value):
    keys = jax.random.split(jax.random.key(seq), 3)
    q = jax.random.normal(keys[0], (1, seq, HEADS, DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, seq, KV_HEADS, DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, seq, KV_HEADS, DIM), jnp.bfloat16)
    visible = _TOPK.value * _BLOCK.value
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"))
    window = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(visible - 1, 0), implementation="cudnn"))
    selection = synthetic_selection(seq, rng)
    # Work actually done by the kernel: each query attends `visible` keys (fewer near the start).
    flops = 4 * HEADS * DIM * sum(min(t + 1, visible) for t in range(0, seq, 64)) * 64
    t_dense, t_window = timeit(dense, q, k, v), timeit(window, q, k, v)
    if "attn_only" in _PASSES.value:
      idx = jnp.pad(selection, ((0, 0), (0, 0), (0, 0),
                                (0, next_power_of_2(_TOPK.value) - _TOPK.value)),
                    constant_values=-1)
      build_index = jax.jit(lambda idx: query_block_unions(
          idx, idx >= 0, num_kv_blocks=seq // _BLOCK.value, block_q=_BLOCK.value))
      unions = build_index(idx)
      seg = jnp.ones((1, seq), jnp.int32)
      kernel = jax.jit(lambda q, k, v, idx, unions: sparse_attention_forward(
          q, k, v, idx, seg, seg, unions, block_q=_BLOCK.value, block_k=_BLOCK.value,
          num_warps=_NUM_WARPS.value, num_stages=_NUM_STAGES.value)[0])
      t_kernel, t_index = timeit(kernel, q, k, v, idx, unions), timeit(build_index, idx)
      rows.append(row(seq, "attn_only", t_kernel, t_dense, t_window, flops, index_build_ms=t_index))
    if "fwd_bwd" in _PASSES.value:
      w = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
      grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w),
                                        (0, 1, 2)))
      # The selection is an argument, not a closed-over constant: XLA would otherwise
      # constant-fold the index build (an argsort over every query block) at compile time.
      sparse_grad = jax.jit(jax.grad(
          lambda q, k, v, sel: jnp.sum(sparse_attention(
              q, k, v, sel, sel >= 0, block_size=_BLOCK.value)[0].astype(jnp.float32) * w),
          (0, 1, 2)))
      # The sparse row includes building the index (inside the op); selection is given.
      t_kernel = timeit(sparse_grad, q, k, v, selection)
      rows.append(row(seq, "fwd_bwd", t_kernel, timeit(grad(dense), q, k, v),
                      timeit(grad(window), q, k, v), 3.5 * flops))
    for r in rows[-2:]:
      if r["seq_len"] == seq:
        print(json.dumps(r), flush=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "dtype": "bfloat16",
                       "block": _BLOCK.value, "topk": _TOPK.value,
                       "local_blocks": _LOCAL.value},
            "kernel": "pallas_kernels/sparse_attention (Triton lowering): forward; fwd_bwd adds the dq and dk/dv kernels",
            "num_warps": _NUM_WARPS.value, "num_stages": _NUM_STAGES.value, "rows": rows}
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(_OUT.value + ".md", "w") as f:
      f.write(f"# Attention benchmark ({result['device']}, jax {result['jax']})\n\n")
      f.write("| seq | pass | sparsejax ms | index ms | cuDNN dense ms | floor (cuDNN window) ms | "
              "speedup vs dense | kernel / floor | kernel TFLOP/s |\n|---|---|---|---|---|---|---|---|---|\n")
      for r in rows:
        index_ms = f"{r['index_build_ms']:.2f}" if "index_build_ms" in r else "in op"
        f.write(f"| {r['seq_len']} | {r['pass']} | {r['sparsejax_ms']:.2f} | {index_ms} | "
                f"{r['cudnn_dense_ms']:.2f} | {r['floor_ms']:.2f} | {r['speedup_vs_cudnn_dense']:.2f}x | "
                f"{r['ratio_to_floor']:.2f}x | {r['kernel_tflops']:.0f} |\n")


if __name__ == "__main__":
  app.run(main)
