"""The decode step's launch knobs on the GPU, one process: each variant's kernel time per call
(profiled) and in-step time, at one cache length and selection.

  python -m experiments.decode_sweep --seq_len=131072 --batch=8 \
      --variants="base;splits=16;splits=16,warps=8;topk_warps=1" --out=$OUT/decode_sweep

A variant is `;`-separated in --variants: comma-separated knob=value pairs over the base (the
layer's defaults). Knobs: splits, warps, stages (sparse_decode's programs per row and KV head,
Triton warps, pipelining stages), topk_warps (block_topk's warps per row), keys_splits,
keys_warps, keys_stages, keys_windows (the decode-key kernels'; keys_windows: compressed
windows per tile, `block_windows`), fused (1: the top-k in the decode scores kernel, as the
layer runs it; 0: the separate top-k kernel), scores_warps (the fused scores kernel's warps),
forced (forced-block programs per row and KV head in the scores kernel, with fused=1; 0: none,
select then attend every block), mosaic (1: sparse_decode's Mosaic GPU kernel; stages is then
its blocks in flight), touch (an experiment: read one element per `touch` KB of the layer's K
and V before the step, to take the attention kernels' TLB misses off their path).
Every variant runs the same inputs as
experiments/bench_decode's in-step rows (`--layers` caches x `--step_reps` passes chained in one
program); kernel time comes from a profiler trace (experiments/profiling.py), which the
in-step wall time of bench_decode follows within its process-to-process noise
(experiments/results/decode_step_1207d.md). The in-step times are sampled in --iters rounds
of one sample per variant (median and quartiles), so a slow stretch of the process lands on
every variant alike. The output of every variant is checked against the base's (same
selection, so equal up to the combine's rounding).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import profiling
from experiments.decode_timing import (CONFIGS, GEOMETRY, SHAPES, chained,
                                       compressed_cache_keys, decode_calls, step_inputs)
from experiments.timing import samples
from pallas_kernels.sparse_decode import default_num_splits
from sparsejax.ops.infllmv2 import InfLLMv2Config

_SEQ = flags.DEFINE_integer("seq_len", 131072, "Cache length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows (one query token each).")
_LAYERS = flags.DEFINE_integer("layers", 4, "Distinct caches chained in the in-step program.")
_STEP_REPS = flags.DEFINE_integer("step_reps", 4, "Passes over the layers in the program.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed samples of the in-step time (median).")
_OUT = flags.DEFINE_string("out", "", "Output path stem (.json and .md).")
_CONFIG = flags.DEFINE_enum("config", "issue", sorted(CONFIGS), "Selection (bench_decode's).")
_VARIANTS = flags.DEFINE_string("variants", "base", "`;`-separated variants (module docstring).")
_IMPLEMENTATION = flags.DEFINE_enum("implementation", "pallas", ["pallas", "interpret"],
                                    "interpret: a CPU smoke run of the script (tiny --seq_len).")
_DUMP_HLO = flags.DEFINE_bool("dump_hlo", False, "Write the first variant's compiled in-step "
                              "program (XLA's fusion names, as the profile shows them) to "
                              "<out>_hlo.txt.")

_KNOBS = {"splits": "splits", "warps": "num_warps", "stages": "num_stages",
          "topk_warps": "topk_num_warps", "keys_splits": "keys_splits",
          "keys_warps": "keys_num_warps", "keys_stages": "keys_num_stages",
          "keys_windows": "keys_windows", "fused": "fused_select",
          "scores_warps": "scores_num_warps", "forced": "forced_splits", "mosaic": "mosaic",
          "touch": "touch_kb"}


def parse_variant(text: str) -> dict:
  """'splits=16,warps=8' -> {'splits': 16, 'num_warps': 8}; 'base' -> {}."""
  knobs = {}
  for pair in filter(None, text.strip().split(",")):
    if pair.strip() == "base":
      continue
    name, _, value = pair.partition("=")
    if name.strip() not in _KNOBS or not value.strip().isdigit():
      raise ValueError(f"--variants: {pair!r} is not knob=int with knob one of {sorted(_KNOBS)}")
    knobs[_KNOBS[name.strip()]] = int(value)
  return knobs


def main(argv):
  del argv
  seq, batch = _SEQ.value, _BATCH.value
  kv_heads = SHAPES[1]
  init_blocks, local_blocks, topk = CONFIGS[_CONFIG.value]
  cfg = InfLLMv2Config(init_blocks=init_blocks, local_blocks=local_blocks, topk=topk, **GEOMETRY)
  variants = [(text.strip(), parse_variant(text)) for text in _VARIANTS.value.split(";")]
  q, q_start, seg, kv_seg, caches = step_inputs(seq, batch, _LAYERS.value)
  cache_keys = jax.jit(lambda k: compressed_cache_keys(k, cfg))
  layers = [(k, v, cache_keys(k)) for k, v in caches]
  shared = (q_start, seg, kv_seg)  # every layer's, passed once (decode_timing.chained)

  rows, programs, reference_out = [], [], None
  out_stem = _OUT.value
  reps = _STEP_REPS.value
  calls = reps * len(layers)  # decode calls per program
  for text, knobs in variants:
    knobs = {"splits": default_num_splits(batch, kv_heads, topk), **knobs}
    _, _, step = decode_calls(cfg, seq, implementation=_IMPLEMENTATION.value, **knobs)
    out = jax.jit(step)(q, *layers[0], *shared)
    if reference_out is None:
      reference_out = out
    diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference_out.astype(jnp.float32))))
    program = chained(step, reps)
    if _DUMP_HLO.value and not rows and out_stem:
      with open(out_stem + "_hlo.txt", "w") as f:
        f.write(program.lower(q, layers, shared).compile().as_text())
    profile = profiling.kernel_times(program, q, layers, shared, reps=3, calls_per_run=calls)
    row = {"variant": text, "knobs": knobs, "kernel_us": profile["summary"]["kernel_us"],
           "launches": profile["summary"]["kernels_per_call"],
           "max_abs_diff_vs_first": diff,
           "kernels": {r["name"]: r["us"] for r in profile["kernels"][:12]}}
    print(json.dumps(row), flush=True)
    rows.append(row)
    programs.append(program)

  # In-step wall time, the variants interleaved: each round takes one sample of every variant,
  # so a slow stretch of the host or the GPU (in one process, two samples of the same step have
  # differed by 10 us: decode_1207h.md) lands on all of them, not on whichever ran then.
  by_variant = [([], []) for _ in programs]
  for program in programs:
    samples(program, q, layers, shared, iters=0)  # compile and warm up
  for _ in range(_ITERS.value):
    for program, (four, one) in zip(programs, by_variant):
      four += samples(program, q, layers, shared, iters=1, reps=4, warmup=False)
      # Each program paying its host dispatch (bench_decode's in-step rows until 2026-12-07).
      one += samples(program, q, layers, shared, iters=1, warmup=False)
  for row, (four, one) in zip(rows, by_variant):
    per_call = lambda ms: np.asarray(ms) / calls * 1e3  # us per decode call
    row["in_step_us"] = float(np.median(per_call(four)))
    row["in_step_us_quartiles"] = [float(x) for x in np.percentile(per_call(four), [25, 75])]
    row["in_step_us_one_program_a_sample"] = float(np.median(per_call(one)))
    print(json.dumps({"variant": row["variant"], "in_step_us": row["in_step_us"],
                      "in_step_us_quartiles": row["in_step_us_quartiles"]}), flush=True)

  if out_stem:
    os.makedirs(os.path.dirname(out_stem) or ".", exist_ok=True)
    with open(out_stem + ".json", "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seq_len": seq,
                 "batch": batch, "config": _CONFIG.value, "rows": rows}, f, indent=2)
    named = ["sparse_decode", "infllmv2_decode_logits", "infllmv2_decode_scores", "block_topk"]
    with open(out_stem + ".md", "w") as f:
      f.write(f"# Decode step launch sweep ({jax.devices()[0].device_kind}, jax {jax.__version__}"
              f"; {seq} tokens, batch {batch}, {_CONFIG.value})\n\n"
              "Per decode call; kernel times from a profiler trace of the in-step program.\n\n"
              "| variant | kernels us | launches | in-step us (quartiles) | " + " | ".join(named)
              + " | other kernels us | max diff vs first |\n" + "|---" * (len(named) + 6) + "|\n")
      for r in rows:
        # By name: the Mosaic kernel is sparse_decode_mosaic_gpu_kernel.
        matches = [[us for k, us in r["kernels"].items() if n in k] for n in named]
        parts = [sum(m) if m else float("nan") for m in matches]
        other = r["kernel_us"] - sum(p for p in parts if p == p)
        f.write(f"| {r['variant']} | {r['kernel_us']:.1f} | {r['launches']:.1f} | "
                f"{r['in_step_us']:.1f} ({r['in_step_us_quartiles'][0]:.1f}-"
                f"{r['in_step_us_quartiles'][1]:.1f}) | " + " | ".join(f"{p:.1f}" for p in parts)
                + f" | {other:.1f} | {r['max_abs_diff_vs_first']:.2g} |\n")


if __name__ == "__main__":
  app.run(main)
