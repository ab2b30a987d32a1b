"""NOSA's offloaded decode step against the in-HBM one, by cache hit rate, in one process.

  python -m experiments.bench_offload --capacity=131072 --batch=8 \
      --hit_rates=1.0,0.95,0.9,0.8,0.5 --out=experiments/results/bench_offload

Shapes as the decode benches: batch 8, 32 query heads over 2 KV heads, head dim 128, bf16,
blocks of 64, 64 selected per row and KV head (NOSA's topk; the own block among them). A step's
selection keeps each of the previous step's 63 other blocks with probability `hit_rate` and
replaces the rest with random blocks (the row's own block always stays), so the copies per step
are about (1 - hit_rate) x 63 blocks of 32 KiB (K and V) per row and KV head. Rows, medians over
--steps consecutive steps (each a different selection):
  hbm_ms        sparse_decode over the whole cache in device memory, with the bias
  offload_ms    sparsejax.inference.offload: the diff, the host-to-device copies of the misses,
                the bias gather and sparse_decode over the device buffer
  loads         mean blocks copied per step (all rows and KV heads)
The device memory each holds is reported too: the whole cache against the buffer.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.sparse_decode import sparse_decode
from sparsejax.inference.offload import (fill_own_block, host_memory_kind, offload,
                                         offloaded_attend)

_CAPACITY = flags.DEFINE_integer("capacity", 131072, "Cache tokens per row.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows.")
_HIT_RATES = flags.DEFINE_list("hit_rates", ["1.0", "0.95", "0.9", "0.8", "0.5"],
                               "Fractions of the previous step's blocks each step keeps.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per hit rate.")
_IMPLEMENTATION = flags.DEFINE_string("implementation", "pallas", "sparse_decode's.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_offload", "Output path stem.")

HEADS, KV_HEADS, DIM, BLOCK, TOPK = 32, 2, 128, 64, 64


def selections(rng, pos, steps: int, hit_rate: float, batch: int):
  """[steps, batch, KV_HEADS, TOPK] int32: ascending, the own block included."""
  own = pos // BLOCK
  current = [[rng.choice(own[r], TOPK - 1, replace=False) for _ in range(KV_HEADS)]
             for r in range(batch)]
  out = np.zeros((steps, batch, KV_HEADS, TOPK), np.int32)
  for s in range(steps):
    for r in range(batch):
      for h in range(KV_HEADS):
        keep = current[r][h][rng.random(TOPK - 1) < hit_rate]
        fresh = np.setdiff1d(np.arange(own[r]), keep)
        new = rng.choice(fresh, TOPK - 1 - len(keep), replace=False)
        current[r][h] = np.r_[keep, new]
        out[s, r, h] = np.sort(np.r_[current[r][h], own[r]])
  return out


def main(argv):
  del argv
  b, cap = _BATCH.value, _CAPACITY.value
  if cap < 2 * TOPK * BLOCK:
    raise ValueError(f"--capacity must hold at least {2 * TOPK} blocks of {BLOCK} (so a step "
                     f"has blocks to replace), got {cap}")
  keys = jax.random.split(jax.random.key(0), 4)
  k = jax.random.normal(keys[0], (b, cap, KV_HEADS, DIM), jnp.bfloat16)
  v = jax.random.normal(keys[1], (b, cap, KV_HEADS, DIM), jnp.bfloat16)
  evict = jax.random.normal(keys[2], (b, cap, KV_HEADS), jnp.float32)
  q = jax.random.normal(keys[3], (b, HEADS, DIM), jnp.bfloat16)
  pos = np.full((b,), cap - 1, np.int32)
  p = jnp.asarray(pos)
  impl = _IMPLEMENTATION.value
  hbm = jax.jit(lambda q, k, v, idx, evict, p: sparse_decode(
      q, k, v, idx, None, p + 1, block_size=BLOCK, key_bias=evict, implementation=impl)[0])
  step = jax.jit(lambda q, state, idx, evict, p: offloaded_attend(q, state, idx, evict, p,
                                                                  implementation=impl))
  rng = np.random.default_rng(0)
  rows = []
  for hit_rate in map(float, _HIT_RATES.value):
    sel = jnp.asarray(selections(rng, pos, _STEPS.value + 2, hit_rate, b))
    state = fill_own_block(offload(k, v, slots=TOPK, block_size=BLOCK), evict, p)
    _, state, _ = step(q, state, sel[0], evict, p)  # compile, and fill the buffer
    jax.block_until_ready(hbm(q, k, v, sel[0], evict, p))
    t_off, t_hbm, loads = [], [], []
    for s in range(1, _STEPS.value + 1):
      start = time.perf_counter()
      out, state, stats = step(q, state, sel[s], evict, p)
      jax.block_until_ready(out)
      t_off.append((time.perf_counter() - start) * 1e3)
      loads.append(int(jnp.sum(stats["loads"])))
      start = time.perf_counter()
      jax.block_until_ready(hbm(q, k, v, sel[s], evict, p))
      t_hbm.append((time.perf_counter() - start) * 1e3)
    row = {"hit_rate": hit_rate, "batch": b, "capacity": cap, "hbm_ms": float(np.median(t_hbm)),
           "offload_ms": float(np.median(t_off)), "loads": float(np.mean(loads)),
           "loaded_mib_per_step": float(np.mean(loads)) * 2 * BLOCK * DIM * 2 / 2**20,
           "hbm_cache_mib": 2 * k.size * k.dtype.itemsize / 2**20,
           "buffer_mib": 2 * state.slot_k.size * state.slot_k.dtype.itemsize / 2**20,
           "host_memory": host_memory_kind()}
    print(json.dumps(row), flush=True)
    rows.append(row)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".json", "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows},
              f, indent=1)
  lines = [f"# Offloaded vs in-HBM NOSA decode ({jax.devices()[0].device_kind}); ms per step",
           "", "| hit rate | HBM decode | offloaded | blocks copied | MiB copied | cache MiB | "
           "buffer MiB |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['hit_rate']:.2f} | {r['hbm_ms']:.3f} | {r['offload_ms']:.3f} | "
                 f"{r['loads']:.0f} | {r['loaded_mib_per_step']:.1f} | {r['hbm_cache_mib']:.0f} "
                 f"| {r['buffer_mib']:.0f} |")
  with open(_OUT.value + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
