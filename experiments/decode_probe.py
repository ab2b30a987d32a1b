"""What sets the decode step's parts' times on the GPU: three probes, kernel time per call from a
profiler trace (experiments/profiling.py), one process.

  python -m experiments.decode_probe --out=$OUT/decode_probe

  topk        the top-k row search (block_topk.topk_indices, select_row inside) on a decode
              step's 16 rows at several row widths and warps: does a pass's cost follow the
              width (fewer keys per pass would pay) or the reduction's latency (it would not)?
              Keys uniform in [0, 1); at the decode width (2048) with the forced (+inf) and
              future (-inf) columns of a 128k query, top 64; narrower rows top --narrow_topk.
  decode      sparse_decode at batch 8, 128k, 32 / 2 heads, d 128, with the first n of 64 slots
              live (random distinct blocks): does its time follow the bytes it reads?
  read        an XLA reduction reading the same bytes as a contiguous bf16 array: the practical
              HBM floor for them.
"""
import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import profiling
from pallas_kernels.block_topk.kernel import topk_indices
from pallas_kernels.sparse_decode import sparse_decode

_OUT = flags.DEFINE_string("out", "", "Output path stem (.json and .md).")
_WIDTHS = flags.DEFINE_list("widths", ["64", "128", "256", "512", "1024", "2048"],
                            "Top-k row widths.")
_WARPS = flags.DEFINE_list("warps", ["1", "2", "4", "8"], "Top-k warps per row.")
_NARROW_TOPK = flags.DEFINE_integer("narrow_topk", 31, "k of the rows narrower than 2048.")
_LIVE = flags.DEFINE_list("live", ["64", "48", "32", "16"], "sparse_decode's live slots.")
_SPLITS = flags.DEFINE_list("splits", ["4", "8", "16"], "sparse_decode's splits.")
_REPS = flags.DEFINE_integer("reps", 20, "Profiled calls per row.")


def kernel_us(fn, *args, name: str = "") -> float:
  """Per call: the kernels whose name contains `name` (all: "")."""
  rows = profiling.kernel_times(jax.jit(fn), *args, reps=_REPS.value)["kernels"]
  return sum(r["us"] for r in rows if name in r["name"])


def topk_rows():
  rows = []
  for width in map(int, _WIDTHS.value):
    key = jax.random.uniform(jax.random.key(width), (16, width), jnp.float32)
    topk = _NARROW_TOPK.value
    if width == 2048:  # a 128k query's row: block 0 and the last 32 forced, none in the future
      cols = jnp.arange(width)
      key = jnp.where((cols == 0) | (cols >= width - 32), jnp.inf, key)
      topk = 64
    want = jax.lax.top_k(key, topk)[1]
    for warps in map(int, _WARPS.value):
      fn = lambda k, w=warps, t=topk: topk_indices(k, topk=t, num_warps=w)
      got = jax.jit(fn)(key)[:, :topk]
      equal = bool(jnp.array_equal(jnp.sort(want, axis=-1), got))
      rows.append({"probe": "topk", "width": width, "topk": topk, "warps": warps,
                   "us": kernel_us(fn, key, name="block_topk"), "equal_to_lax_top_k": equal})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def decode_rows():
  batch, seq, heads, kv_heads, d, block = 8, 131072, 32, 2, 128, 64
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, heads, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, d), jnp.bfloat16)
  lengths = jnp.full((batch,), seq, jnp.int32)
  # Random distinct blocks per (row, KV head), ascending, as selections come.
  perm = jax.random.uniform(keys[3], (batch, kv_heads, seq // block)).argsort(axis=-1)
  rows = []
  for live in map(int, _LIVE.value):
    idx = jnp.sort(perm[..., :live], axis=-1).astype(jnp.int32)
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, 64 - live)), constant_values=-1)
    kv_bytes = batch * kv_heads * live * block * d * 2 * 2
    for splits in map(int, _SPLITS.value):
      fn = lambda q, k, v, idx, n=splits: sparse_decode(q, k, v, idx, None, lengths,
                                                        block_size=block, num_splits=n)[0]
      us = kernel_us(fn, q, k, v, idx, name="sparse_decode")
      rows.append({"probe": "decode", "live_slots": live, "splits": splits, "us": us,
                   "kv_mb": kv_bytes / 1e6, "gbps": kv_bytes / us / 1e3})
      print(json.dumps(rows[-1]), flush=True)
    flat = jnp.ones((kv_bytes // 2,), jnp.bfloat16)
    us = kernel_us(lambda x: jnp.sum(x, dtype=jnp.float32), flat)
    rows.append({"probe": "read", "mb": kv_bytes / 1e6, "us": us, "gbps": kv_bytes / us / 1e3})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv):
  del argv
  rows = topk_rows() + decode_rows()
  if not _OUT.value:
    return
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  device = jax.devices()[0].device_kind
  with open(_OUT.value + ".json", "w") as f:
    json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=2)
  with open(_OUT.value + ".md", "w") as f:
    f.write(f"# Decode probes ({device}, jax {jax.__version__}); kernel us per call\n\n"
            "| width | k | warps | top-k us | equal |\n|---|---|---|---|---|\n")
    for r in rows:
      if r["probe"] == "topk":
        f.write(f"| {r['width']} | {r['topk']} | {r['warps']} | {r['us']:.2f} | "
                f"{r['equal_to_lax_top_k']} |\n")
    f.write("\n| live slots | splits | K/V MB | sparse_decode us | GB/s |\n|---|---|---|---|---|\n")
    for r in rows:
      if r["probe"] == "decode":
        f.write(f"| {r['live_slots']} | {r['splits']} | {r['kv_mb']:.1f} | {r['us']:.1f} | "
                f"{r['gbps']:.0f} |\n")
    f.write("\n| contiguous MB | XLA sum us | GB/s |\n|---|---|---|\n")
    for r in rows:
      if r["probe"] == "read":
        f.write(f"| {r['mb']:.1f} | {r['us']:.1f} | {r['gbps']:.0f} |\n")


if __name__ == "__main__":
  app.run(main)
