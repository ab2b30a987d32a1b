"""Top-k block selection alone on the GPU: XLA's top_k + sort (`sparsejax.ops.infllmv2.top_blocks`)
against the sort-free kernel (pallas_kernels/block_topk), on InfLLM-V2's ranking keys.

  python -m experiments.bench_topk --seq_lens=32768,131072 --out=experiments/results/bench_topk

Rows = seq_len x 2 KV heads (batch 1), seq_len / 64 blocks each, k = --topk; keys are uniform
scores with the forced (+inf) and future (-inf) columns of a causal selection (init 1 block,
--local_blocks local). --decode_rows also times that many rows of the longest length (a decode
step's batch x KV heads; at that size the wall clock is mostly dispatch: bench_decode's
profile times the kernel in a step). --num_warps takes a list: one row each. Times are medians
of --iters calls after two warm-ups (wall clock per jitted call); every row checks the kernel's
output equals XLA's bit for bit.
"""
import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import timing

from pallas_kernels.block_topk import top_blocks
from sparsejax.ops import infllmv2 as ref_ops

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "131072"], "Sequence lengths.")
_TOPK = flags.DEFINE_integer("topk", 64, "Blocks selected per row.")
_LOCAL = flags.DEFINE_integer("local_blocks", 32, "Forced local blocks.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "", "Output path stem (.json and .md).")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["4"], "Warps per kernel program (one row each); "
                               "several values: one row of results each.")
_DECODE_ROWS = flags.DEFINE_integer("decode_rows", 16, "Also time this many rows (a decode step's "
                                    "batch x KV heads) of the longest length; 0: skip.")
KV_HEADS, BLOCK = 2, 64


def timeit(fn, *args):
  return timing.timeit(fn, *args, iters=_ITERS.value)


@jax.jit
def causal_keys(scores):
  """scores [t, kvh, nb] -> ranking keys as selection_keys makes them for query t (block t//64)."""
  t, _, nb = scores.shape
  q_block = (jnp.arange(t) // BLOCK)[:, None, None]
  j = jnp.arange(nb)[None, None, :]
  forced = (j < 1) | ((j <= q_block) & (j > q_block - _LOCAL.value))
  return jnp.where(j > q_block, -jnp.inf, jnp.where(forced, jnp.inf, scores))


def main(argv):
  del argv
  rows = []
  keys = []
  for seq in map(int, _SEQ_LENS.value):
    scores = jax.random.uniform(jax.random.key(seq), (seq, KV_HEADS, seq // BLOCK), jnp.float32)
    keys.append((seq, causal_keys(scores)))
  if _DECODE_ROWS.value:  # the last queries' rows: a decode step's few rows of the full width
    seq, key = keys[-1]
    keys.append((seq, key.reshape(-1, key.shape[-1])[-_DECODE_ROWS.value:]))
  for seq, key in keys:
    xla = jax.jit(lambda k: ref_ops.top_blocks(k, _TOPK.value))
    t_xla = timeit(xla, key)
    for warps in map(int, _NUM_WARPS.value):
      kernel = jax.jit(lambda k, w=warps: top_blocks(k, _TOPK.value, implementation="pallas",
                                                     num_warps=w))
      agree = all(bool(jnp.array_equal(a, b)) for a, b in zip(xla(key), kernel(key)))
      t_kernel = timeit(kernel, key)
      n = key.size // key.shape[-1]
      row = {"seq_len": seq, "rows": n, "blocks": key.shape[-1], "topk": _TOPK.value,
             "num_warps": warps, "xla_ms": t_xla, "kernel_ms": t_kernel,
             "speedup": t_xla / t_kernel, "agree": agree, "key_bytes": key.size * 4,
             "kernel_read_gbps": key.size * 4 / t_kernel / 1e6}
      print(json.dumps(row), flush=True)
      rows.append(row)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}
    with open(_OUT.value + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(_OUT.value + ".md", "w") as f:
      f.write(f"# Top-k block selection ({result['device']}, jax {result['jax']})\n\n"
              "| seq | rows x blocks | k | warps | XLA top_k + sort ms | kernel ms | speedup | "
              "keys read GB/s | equal |\n|---|---|---|---|---|---|---|---|---|\n")
      for r in rows:
        f.write(f"| {r['seq_len']} | {r['rows']} x {r['blocks']} | {r['topk']} | "
                f"{r['num_warps']} | "
                f"{r['xla_ms']:.2f} | {r['kernel_ms']:.2f} | {r['speedup']:.2f}x | "
                f"{r['kernel_read_gbps']:.0f} | {r['agree']} |\n")


if __name__ == "__main__":
  app.run(main)
