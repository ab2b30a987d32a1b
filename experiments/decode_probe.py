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
  mosaic      sparse_decode's Mosaic GPU kernel (sparse_decode/kernel_mosaic.py: TMA loads of
              `stages` blocks in flight, the combine by the last split) against the Triton
              kernel on the decode rows' inputs, checked against the reference; also with 8
              extra partials, as the decode step merges the forced blocks' partials.
  cold        both kernels over 31 live slots after a 256 MB write that evicts the L2 (as in the
              decode step, where each layer's K/V is cold), with the slots spread over the row's
              cache (random blocks: ~31 2 MB pages a row) or clustered (31 consecutive blocks: 1-2
              pages): the same bytes, so a gap between the two is the page (TLB) misses' cost,
              and the warm rows' gap to the cold ones is DRAM latency. "pages touched" reads one
              element per 2 MB (or 64 KB) of K and V between the flush and the kernel: if the
              misses are the cost, that takes it back. First, the Triton kernel warm and cold
              on a head-major cache (each (row, KV head) its own batch row: a block's K is 16 KB
              in one piece, not 64 rows of 256 B every 512 B): does the [batch, capacity,
              kv_heads, d] layout cost DRAM efficiency?
"""
import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import profiling
from experiments.decode_timing import touch_pages
from pallas_kernels.block_topk.kernel import topk_indices
from pallas_kernels.sparse_decode import sparse_decode, sparse_decode_reference
from pallas_kernels.sparse_decode.kernel_mosaic import sparse_decode_mosaic

_OUT = flags.DEFINE_string("out", "", "Output path stem (.json and .md).")
_WIDTHS = flags.DEFINE_list("widths", ["64", "128", "256", "512", "1024", "2048"],
                            "Top-k row widths.")
_WARPS = flags.DEFINE_list("warps", ["1", "2", "4", "8"], "Top-k warps per row.")
_NARROW_TOPK = flags.DEFINE_integer("narrow_topk", 31, "k of the rows narrower than 2048.")
_LIVE = flags.DEFINE_list("live", ["64", "48", "32", "16"], "sparse_decode's live slots.")
_SPLITS = flags.DEFINE_list("splits", ["4", "8", "16"], "sparse_decode's splits.")
_REPS = flags.DEFINE_integer("reps", 20, "Profiled calls per row.")
_PROBES = flags.DEFINE_list("probes", ["topk", "decode", "mosaic"], "Which probes to run.")
_STAGES = flags.DEFINE_list("stages", ["2", "4"], "The Mosaic probe's blocks in flight.")


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


def decode_inputs():
  """The decode rows' inputs: batch 8, 128k, 32 / 2 heads, d 128; a random block order per (row,
  KV head) whose first n blocks, ascending, are a row's n live slots (`live_idx`)."""
  batch, seq, heads, kv_heads, d, block = 8, 131072, 32, 2, 128, 64
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, heads, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, d), jnp.bfloat16)
  lengths = jnp.full((batch,), seq, jnp.int32)
  # Random distinct blocks per (row, KV head), ascending, as selections come.
  perm = jax.random.uniform(keys[3], (batch, kv_heads, seq // block)).argsort(axis=-1)
  return q, k, v, lengths, perm, block


def live_idx(perm, live: int, width: int):
  idx = jnp.sort(perm[..., :live], axis=-1).astype(jnp.int32)
  return jnp.pad(idx, ((0, 0), (0, 0), (0, width - live)), constant_values=-1)


def decode_rows():
  q, k, v, lengths, perm, block = decode_inputs()
  batch, heads, d = q.shape
  kv_heads = k.shape[2]
  rows = []
  for live in map(int, _LIVE.value):
    idx = live_idx(perm, live, 64)
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


def extra_partials(q, k, v, lengths, perm, first: int, parts: int, per_part: int, block: int):
  """Partials over blocks perm[first : first + parts * per_part], per_part a part, as the
  forced-block programs write them (float32 out [b, kv_heads, parts * rows, d], lse)."""
  batch, heads, d = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  outs, lses = [], []
  for part in range(parts):
    lo = first + part * per_part
    ids = jnp.pad(perm[..., lo:lo + per_part].astype(jnp.int32),
                  ((0, 0), (0, 0), (0, 128 - per_part)), constant_values=-1)
    o, lse = sparse_decode_reference(*f32, ids, None, lengths, block_size=block)
    outs.append(o.reshape(batch, kv_heads, group, d))
    lses.append(lse.reshape(batch, kv_heads, group))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def mosaic_rows():
  q, k, v, lengths, perm, block = decode_inputs()
  batch, heads, d = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(batch, kv_heads, heads // kv_heads, d)
  rows = []
  # (live slots, extra parts): the plain rows, then the decode step's: 31 unforced blocks and
  # 8 partials over 32 forced ones.
  cases = [(live, 0) for live in map(int, _LIVE.value)] + [(31, 8)]
  for live, parts in cases:
    idx = live_idx(perm, live, 128)
    kv_bytes = batch * kv_heads * live * block * d * 2 * 2
    extra = None
    want = sparse_decode_reference(q, k, v, idx, None, lengths, block_size=block)
    if parts:
      extra = extra_partials(q, k, v, lengths, perm, live, parts, 4, block)
      want = sparse_decode_reference(q, k, v, live_idx(perm, live + 4 * parts, 128), None,
                                     lengths, block_size=block)
    for splits in map(int, _SPLITS.value):
      triton = lambda q, k, v, idx, extra, n=splits: sparse_decode(
          q, k, v, idx, None, lengths, block_size=block, num_splits=n, extra_partials=extra)[0]
      rows.append({"probe": "mosaic", "kernel": "triton", "live_slots": live,
                   "extra_parts": parts, "splits": splits, "stages": 3,
                   "kv_mb": kv_bytes / 1e6,
                   "us": kernel_us(triton, q, k, v, idx, extra, name="sparse_decode")})
      print(json.dumps(rows[-1]), flush=True)
      for stages in map(int, _STAGES.value):
        fn = jax.jit(lambda qg, k, v, idx, extra, n=splits, s=stages: sparse_decode_mosaic(
            idx, lengths, qg, k, v, extra, block_k=block, num_splits=n, stages=s))
        out, lse = fn(qg, k, v, idx, extra)
        err = float(jnp.max(jnp.abs(out.reshape(batch, heads, d).astype(jnp.float32)
                                    - want[0].astype(jnp.float32))))
        lse_err = float(jnp.max(jnp.abs(lse.reshape(batch, heads) - want[1])))
        profile = profiling.kernel_times(fn, qg, k, v, idx, extra, reps=_REPS.value)["kernels"]
        us = sum(r["us"] for r in profile)
        rows.append({"probe": "mosaic", "kernel": "mosaic", "live_slots": live,
                     "extra_parts": parts, "splits": splits, "stages": stages,
                     "kv_mb": kv_bytes / 1e6, "us": us, "gbps": kv_bytes / us / 1e3,
                     "kernels": {r["name"]: r["us"] for r in profile}, "max_abs_err_out": err,
                     "max_abs_err_lse": lse_err})
        print(json.dumps(rows[-1]), flush=True)
  return rows


def cold_rows():
  q, k, v, lengths, perm, block = decode_inputs()
  batch, heads, d = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(batch, kv_heads, heads // kv_heads, d)
  live, splits = 31, 8
  n_blocks = perm.shape[-1]
  layouts = {"spread": live_idx(perm, live, 128),
             "clustered": jnp.pad(jnp.broadcast_to(
                 jnp.arange(n_blocks - 64, n_blocks - 64 + live, dtype=jnp.int32),
                 (batch, kv_heads, live)), ((0, 0), (0, 0), (0, 128 - live)),
                 constant_values=-1)}
  triton = lambda lens: lambda q, k, v, idx: sparse_decode(
      q, k, v, idx, None, lens, block_size=block, num_splits=splits)[0]
  mosaic = lambda q, k, v, idx: sparse_decode_mosaic(
      idx, lengths, q.reshape(qg.shape), k, v, block_k=block, num_splits=splits, stages=2)[0]
  flush = jnp.ones((128 * 2**20,), jnp.bfloat16)  # 256 MB, five times the H100's L2

  def after_flush(attend, touch_kb):
    """attend after the flush; with touch_kb, after a read of one element per touch_kb KB of K
    and V too (a page's translation in the TLB, its data out of the L2)."""
    def fn(q, k, v, idx, flush):
      flushed, q = jax.lax.optimization_barrier((flush * 2, q))
      if touch_kb:  # (q comes out of the flush's barrier: the read runs after the flush)
        q = touch_pages(q, (k, v), touch_kb)
      return attend(q, k, v, idx), flushed
    return fn

  # First the same bytes with each (row, KV head)'s cache contiguous (batch 16 of one KV head):
  # a block is then 16 KB in one piece, not 64 rows of 256 B every 512 B.
  rows_h = batch * kv_heads
  head_major = (q.reshape(rows_h, heads // kv_heads, d),
                *[x.transpose(0, 2, 1, 3).reshape(rows_h, -1, 1, d) for x in (k, v)],
                layouts["spread"].reshape(rows_h, 1, -1))
  plain = (("warm", 0), ("cold", 0))
  touched = plain + (("cold, 2 MB pages touched", 2048), ("cold, 64 KB pages touched", 64))
  # (kernel, slots, profile name, attend, its (q, k, v, idx), cache states)
  cases = [("triton", "spread, head-major cache", "sparse_decode",
            triton(jnp.repeat(lengths, kv_heads)), head_major, plain)]
  cases += [(kernel, layout, name, attend, (q, k, v, idx), touched)
            for layout, idx in layouts.items()
            for kernel, name, attend in (("triton", "sparse_decode", triton(lengths)),
                                         ("mosaic", "mosaic", mosaic))]
  rows = []
  for kernel, slots, name, attend, args, caches in cases:
    for cache, touch_kb in caches:
      fn = attend if cache == "warm" else after_flush(attend, touch_kb)
      rows.append({"probe": "cold", "kernel": kernel, "slots": slots, "cache": cache,
                   "live_slots": live, "splits": splits,
                   "us": kernel_us(fn, *args, *(() if cache == "warm" else (flush,)),
                                   name=name)})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv):
  del argv
  probes = {"topk": topk_rows, "decode": decode_rows, "mosaic": mosaic_rows,
            "cold": cold_rows}
  unknown = sorted(set(_PROBES.value) - set(probes))
  if unknown:
    raise app.UsageError(f"--probes: {unknown} not among {sorted(probes)}")
  rows = [r for name in _PROBES.value for r in probes[name]()]
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
    f.write("\n| kernel | live slots | extra parts | splits | stages | sparse_decode us | "
            "max err out / lse |\n|---|---|---|---|---|---|---|\n")
    for r in rows:
      if r["probe"] == "mosaic":
        err = (f"{r['max_abs_err_out']:.1e} / {r['max_abs_err_lse']:.1e}"
               if "max_abs_err_out" in r else "")
        f.write(f"| {r['kernel']} | {r['live_slots']} | {r['extra_parts']} | {r['splits']} | "
                f"{r['stages']} | {r['us']:.1f} | {err} |\n")
    f.write("\n| kernel | slots | K/V | sparse_decode us |\n|---|---|---|---|\n")
    for r in rows:
      if r["probe"] == "cold":
        f.write(f"| {r['kernel']} | {r['slots']} | {r['cache']} | {r['us']:.1f} |\n")
    f.write("\n| contiguous MB | XLA sum us | GB/s |\n|---|---|---|\n")
    for r in rows:
      if r["probe"] == "read":
        f.write(f"| {r['mb']:.1f} | {r['us']:.1f} | {r['gbps']:.0f} |\n")


if __name__ == "__main__":
  app.run(main)
