"""NOSA's prefill cost on the GPU against InfLLM-V2's and cuDNN dense, in one process.

  python -m experiments.bench_nosa --seq_lens=32768,65536 --out=experiments/results/bench_nosa

Shapes as experiments/bench_attention: batch 1, 32 query heads over 2 KV heads, head dim 128,
bf16, causal; NOSA's shipped split (init 1 + local 17 + 15 query-aware, 31 query-agnostic:
topk 64 blocks of 64), and InfLLM-V2 at the same 64 blocks. Rows, each the median of --iters:
  selection   InfLLM-V2's (scoring kernel + top-k kernel) and NOSA's (the same at 33 blocks,
              then the eviction blocks' keys in XLA and a second top-k)
  attention   given a selection: InfLLM-V2's default forward (the Mosaic kernel on Hopper), the
              Triton forward without a bias, NOSA's biased Triton forward, and the biased Mosaic
              forward (opt-in; its largest difference from the Triton one is reported)
  fwd, fwd_bwd  selection included (the gradient of the attention's q, k, v, and NOSA's bias)
against cuDNN dense in the same process. The bias adds one [block_k] load per visited block
to the forward and a row sum of dS to the dK/dV kernel; the Mosaic kernels take no bias yet, so
NOSA's attention runs on the Triton kernels.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import timing
from pallas_kernels.block_scores import score_and_select
from pallas_kernels.block_topk import top_blocks_fn
from pallas_kernels.sparse_attention import Launch, sparse_attention
from sparsejax.ops.nosa import NOSAConfig, nosa_select_blocks

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "65536"], "Sequence lengths.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed calls per row (median).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_nosa", "Output path stem.")

HEADS, KV_HEADS, DIM, BLOCK = 32, 2, 128, 64
NOSA = NOSAConfig()                                   # 1 + 17 + 15 query-aware, 64 in all
INFLLMV2 = dataclasses.replace(NOSA.query_aware(), topk=NOSA.topk)  # the same 64 blocks


def inputs(seq: int):
  """q, k, v as bench_attention's structured inputs (each query block of 64 shares a direction
  per head) and eviction scores of a trained-looking head (A ~ 1, per-token spread ~ 1)."""
  keys = jax.random.split(jax.random.key(seq), 5)
  shared = jax.random.normal(keys[0], (1, seq // 64, 1, HEADS, DIM))
  noise = jax.random.normal(keys[1], (1, seq // 64, 64, HEADS, DIM))
  q = (shared + 0.5 * noise).reshape(1, seq, HEADS, DIM).astype(jnp.bfloat16)
  k = jax.random.normal(keys[2], (1, seq, KV_HEADS, DIM), jnp.bfloat16)
  v = jax.random.normal(keys[3], (1, seq, KV_HEADS, DIM), jnp.bfloat16)
  evict = jax.nn.softplus(jax.random.normal(keys[4], (1, seq, KV_HEADS), jnp.float32))
  return q, k, v, evict


def main(argv):
  del argv
  tk = top_blocks_fn("pallas")
  select_v2 = lambda q, k: score_and_select(q, k, INFLLMV2, topk_implementation="pallas")
  aware = lambda q, k, cfg: score_and_select(q, k, cfg, topk_implementation="pallas")
  select_nosa = lambda q, k, e: nosa_select_blocks(q, k, e, NOSA, query_aware_fn=aware,
                                                   top_blocks_fn=tk)
  attend = lambda q, k, v, idx, valid, bias=None, launch=Launch(): sparse_attention(
      q, k, v, idx, valid, key_bias=bias, block_size=BLOCK, heads_per_program=16, launch=launch)[0]
  triton = Launch(forward_kernel="triton", dkdv_kernel="triton")
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")
  full_v2 = lambda q, k, v, e: attend(q, k, v, *select_v2(q, k))
  full_nosa = lambda q, k, v, e: attend(q, k, v, *select_nosa(q, k, e), bias=e)
  full_dense = lambda q, k, v, e: dense(q, k, v)

  def grad(f):
    return jax.jit(jax.grad(lambda q, k, v, e, w: jnp.sum(f(q, k, v, e).astype(jnp.float32) * w),
                            (0, 1, 2, 3)))

  time = lambda f, *a: timing.timeit(f, *a, iters=_ITERS.value)
  rows = []
  for seq in map(int, _SEQ_LENS.value):
    q, k, v, e = inputs(seq)
    w = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    idx2, valid2 = jax.jit(select_v2)(q, k)
    idxn, validn = jax.jit(select_nosa)(q, k, e)
    # How much the two selections overlap: NOSA keeps InfLLM-V2's first 33, then diverges.
    shared = jnp.mean(jnp.sum((idxn[..., :, None] == idx2[..., None, :]) & validn[..., :, None]
                              & valid2[..., None, :], axis=(-1, -2)) / 64.0)
    r = {"seq_len": seq, "batch": 1, "device": jax.devices()[0].device_kind,
         "nosa_blocks_shared_with_infllmv2": float(shared)}
    r["selection_infllmv2_ms"] = time(jax.jit(select_v2), q, k)
    r["selection_nosa_ms"] = time(jax.jit(select_nosa), q, k, e)
    r["attention_infllmv2_default_ms"] = time(jax.jit(attend), q, k, v, idx2, valid2)
    r["attention_triton_no_bias_ms"] = time(
        jax.jit(lambda *a: attend(*a, launch=triton)), q, k, v, idxn, validn)
    r["attention_nosa_bias_ms"] = time(jax.jit(attend), q, k, v, idxn, validn, e)
    mosaic = Launch(forward_kernel="mosaic", dkdv_kernel="triton")
    try:  # the Mosaic forward with the bias: opt-in until this row says it is right and faster
      got = jax.jit(lambda *a: attend(*a, launch=mosaic))(q, k, v, idxn, validn, e)
      want = jax.jit(attend)(q, k, v, idxn, validn, e)
      r["mosaic_bias_max_abs_diff"] = float(jnp.max(jnp.abs(got.astype(jnp.float32)
                                                            - want.astype(jnp.float32))))
      r["attention_nosa_bias_mosaic_ms"] = time(
          jax.jit(lambda *a: attend(*a, launch=mosaic)), q, k, v, idxn, validn, e)
    except Exception as err:  # noqa: BLE001 (a failing opt-in kernel must not cost the rows)
      r["mosaic_bias_error"] = f"{type(err).__name__}: {err}"[:400]
    r["fwd_cudnn_dense_ms"] = time(jax.jit(full_dense), q, k, v, e)
    r["fwd_infllmv2_ms"] = time(jax.jit(full_v2), q, k, v, e)
    r["fwd_nosa_ms"] = time(jax.jit(full_nosa), q, k, v, e)
    r["fwd_bwd_cudnn_dense_ms"] = time(grad(full_dense), q, k, v, e, w)
    r["fwd_bwd_infllmv2_ms"] = time(grad(full_v2), q, k, v, e, w)
    r["fwd_bwd_nosa_ms"] = time(grad(full_nosa), q, k, v, e, w)
    for p in ("fwd", "fwd_bwd"):
      r[f"{p}_nosa_over_infllmv2"] = r[f"{p}_nosa_ms"] / r[f"{p}_infllmv2_ms"]
      r[f"{p}_speedup_nosa_vs_cudnn_dense"] = r[f"{p}_cudnn_dense_ms"] / r[f"{p}_nosa_ms"]
    print(json.dumps(r), flush=True)
    rows.append(r)
    write(rows)


def write(rows):
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".json", "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "nosa": dataclasses.asdict(NOSA), "rows": rows}, f, indent=1)
  cols = [("seq", "seq_len"), ("select v2", "selection_infllmv2_ms"),
          ("select NOSA", "selection_nosa_ms"), ("attn v2 (default)", "attention_infllmv2_default_ms"),
          ("attn Triton, no bias", "attention_triton_no_bias_ms"),
          ("attn NOSA (bias)", "attention_nosa_bias_ms"),
          ("attn NOSA (bias, Mosaic)", "attention_nosa_bias_mosaic_ms"),
          ("fwd dense", "fwd_cudnn_dense_ms"),
          ("fwd v2", "fwd_infllmv2_ms"), ("fwd NOSA", "fwd_nosa_ms"),
          ("fwd+bwd dense", "fwd_bwd_cudnn_dense_ms"), ("fwd+bwd v2", "fwd_bwd_infllmv2_ms"),
          ("fwd+bwd NOSA", "fwd_bwd_nosa_ms")]
  lines = [f"# NOSA vs InfLLM-V2 prefill ({jax.devices()[0].device_kind}, jax {jax.__version__}); "
           "ms, median", "", "| " + " | ".join(c for c, _ in cols) + " |",
           "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r.get(k), float)
                                   else str(r.get(k, "-")) for _, k in cols) + " |")
  with open(_OUT.value + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
