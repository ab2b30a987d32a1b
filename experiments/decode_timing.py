"""Decode timing shared by experiments/bench_decode.py, bench_attention.py's decode rows and
decode_sweep.py (no flags here: each binary defines its own). bench_decode.py's docstring says
what is timed and how; `decode_rows` returns its rows.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp

from experiments import profiling
from experiments.timing import timeit

from pallas_kernels.block_scores import decode_selection_keys
from pallas_kernels.block_scores import select_decode_blocks as select_decode_blocks_kernels
from pallas_kernels.block_topk import top_blocks_fn
from pallas_kernels.infllmv2_decode import resolve_forced_splits
from pallas_kernels.infllmv2_decode import infllmv2_decode as infllmv2_decode_kernels
from pallas_kernels.sparse_decode import default_num_splits, sparse_decode
from pallas_kernels.sparse_decode import sparse_decode_reference
from sparsejax.ops.infllmv2 import InfLLMv2Config, compress_keys, select_decode_blocks

HBM_BYTES_PER_S = 3.35e12
# (init_blocks, local_blocks, topk): topk counts every block, the forced ones included.
CONFIGS = {"shipped": (1, 32, 96), "issue": (1, 32, 64)}
QUICK_CONFIGS = {"shipped": (1, 2, 6), "issue": (1, 2, 4)}
# (heads, kv_heads, head_dim, dtype) and InfLLMv2Config geometry: the GPU rows, --quick's CPU rows.
SHAPES = (32, 2, 128, jnp.bfloat16)
GEOMETRY = dict(block_size=64, compress_window=32, compress_stride=16, dense_len=8192)
QUICK_SHAPES = (4, 2, 16, jnp.float32)
QUICK_GEOMETRY = dict(block_size=16, compress_window=8, compress_stride=4, dense_len=64,
                      lse_window=32, lse_stride=16)


def chained(call, reps: int):
  """One jitted program(q, layers, shared=()) running call(q, *layer, *shared) over every
  layer's arguments `reps` times, each call's q nudged by the previous call's whole output (a
  dependence XLA cannot drop; q's values do not change), so the calls run one after another as
  a model's layers do. `shared` are the arguments every layer takes alike, passed once (as a
  model's layers share its cache's positions and segment ids): XLA then computes what depends
  on them alone once a program, as it does in the model (as separate arguments of each layer,
  that work ran once a call). call(...) -> any pytree; its first leaf is the output."""

  @jax.jit
  def program(q, layers, shared=()):
    for _ in range(reps):
      for layer in layers:
        out = jax.tree.leaves(call(q, *layer, *shared))[0]
        # The whole output feeds the next call, as a model's next layer reads all of it (with
        # one element, XLA computed an XLA split combine for that element alone).
        out = out.reshape(q.shape) if out.size == q.size else out.reshape(-1)[0]
        q = q + (out.astype(jnp.float32) * 1e-30).astype(q.dtype)
    return q

  return program


def step_time(call, q, layers, shared=(), *, reps: int, iters: int, programs: int = 1) -> float:
  """ms per call of `call` inside a chained program (see `chained`), `programs` of them
  dispatched back to back per timed sample: from 2 on, the host's dispatch of one program
  overlaps the device's run of the one before, as in a model's decode loop."""
  return timeit(chained(call, reps), q, layers, shared, iters=iters, reps=programs) / (
      reps * len(layers))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_inputs(key, q_shape, kv_shape, dtype):
  """Fresh normal q, k, v (never zeros), made on the device in one program."""
  keys = jax.random.split(key, 3)
  return (jax.random.normal(keys[0], q_shape, dtype), jax.random.normal(keys[1], kv_shape, dtype),
          jax.random.normal(keys[2], kv_shape, dtype))


def step_inputs(seq: int, batch: int, layers: int, shapes=SHAPES, segments: bool = True):
  """One decode step's inputs at cache length seq: (q, q_start, seg, kv_seg, caches), every
  row's cache full; caches = `layers` distinct (k, v) pairs (at least one: the first is the one
  the per-call timings use)."""
  heads, kv_heads, dim, dtype = shapes
  q_shape, kv_shape = (batch, 1, heads, dim), (batch, seq, kv_heads, dim)
  q, k, v = random_inputs(jax.random.key(seq), q_shape, kv_shape, dtype)
  caches = [(k, v)] + [random_inputs(jax.random.key(seq + 1 + i), q_shape, kv_shape, dtype)[1:]
                       for i in range(layers - 1)]
  q_start = jnp.full((batch,), seq - 1, jnp.int32)
  seg = jnp.ones((batch, 1), jnp.int32) if segments else None
  kv_seg = jnp.ones((batch, seq), jnp.int32) if segments else None
  return q, q_start, seg, kv_seg, caches


def compressed_cache_keys(k, cfg):
  """The cache's compressed keys: (kc, the coarse kc or None), as the model keeps them."""
  fine = compress_keys(k, window=cfg.compress_window, stride=cfg.compress_stride)
  coarse = (compress_keys(k, window=cfg.lse_window, stride=cfg.lse_stride)
            if cfg.approximate_lse else None)
  return fine, coarse


def touch_pages(x, arrays, kb: int):
  """x (float, finite), after a read of one element per `kb` KB of each of `arrays`; the read
  comes after x is computed (its indices depend on x) and before anything that uses the
  result."""
  first = (x.reshape(-1)[0] * 0).astype(jnp.int32)  # (0 * float is not folded away)
  touched = sum(jnp.sum(a.reshape(-1)[jnp.arange(0, a.size, kb * 1024 // a.dtype.itemsize)
                                      + first].astype(jnp.float32)) for a in arrays)
  return jax.lax.optimization_barrier((touched, x))[1]


def decode_calls(cfg, seq: int, *, implementation: str, splits: int, num_warps: int = 4,
                 num_stages: int = 3, topk_kernel: bool = True, topk_num_warps: int | None = None,
                 keys_kernel: bool = True, keys_splits: int | None = None,
                 keys_num_warps: int = 4, keys_num_stages: int = 2, keys_windows: int = 64,
                 fused_select: bool = True, scores_num_warps: int | None = None,
                 forced_splits: int | None = None, mosaic: bool = False, touch_kb: int = 0):
  """The decode attention as the InfLLM-V2 layer runs it, in its parts: (select(q, kc, q_start,
  seg, kv_seg) -> (idx, valid), attend(q, k, v, idx, valid, q_start, seg, kv_seg) -> out,
  step(q, k, v, kc, q_start, seg, kv_seg) -> out), kc = `compressed_cache_keys(k, cfg)`; the
  keyword arguments are the kernels' launch knobs (experiments/decode_sweep.py sweeps them).
  fused_select: with both kernels on, the top-k runs in the scores kernel (the layer's way);
  topk_num_warps then does nothing, and scores_num_warps sets the scores kernel's warps;
  forced_splits: with the fused selection, `step` is pallas_kernels.infllmv2_decode (as the layer
  runs it), whose scores kernel attends the forced blocks with that many programs per row and
  KV head (None: its default; 0: none, select then attend every block); mosaic: sparse_decode's
  Mosaic GPU kernel (kernel="mosaic") in place of the Triton one; touch_kb (an experiment, 0:
  off): `step` first reads one element per touch_kb KB of K and V, so that the pages'
  translations are in the TLB when the attention kernels gather their blocks."""
  top = top_blocks_fn(implementation, topk_num_warps) if topk_kernel else None
  decode_kernel = "mosaic" if mosaic else "triton"
  knobs = dict(implementation=implementation, splits=keys_splits, num_warps=keys_num_warps,
               num_stages=keys_num_stages, block_windows=keys_windows)
  keys_fn = functools.partial(decode_selection_keys, **knobs) if keys_kernel else None
  fused = (functools.partial(select_decode_blocks_kernels, **knobs,
                             scores_num_warps=scores_num_warps)
           if keys_kernel and topk_kernel and fused_select else None)

  def select(q, kc, q_start, seg, kv_seg):
    kw = dict(kv_len=seq, q_start=q_start, kc_coarse=kc[1], segment_ids=seg,
              kv_segment_ids=kv_seg)
    if fused:
      return fused(q, kc[0], cfg, **kw)
    return select_decode_blocks(q, kc[0], cfg, top_blocks_fn=top, selection_keys_fn=keys_fn,
                                **kw)

  def attend(q, k, v, idx, valid, q_start, seg, kv_seg):
    del valid  # its dead slots hold -1, which is all the kernel needs (as the layer passes it)
    out, _ = sparse_decode(q[:, 0], k, v, idx[:, 0], None, q_start + 1,
                           block_size=cfg.block_size,
                           q_segment_ids=None if seg is None else seg[:, 0],
                           kv_segment_ids=kv_seg, implementation=implementation,
                           num_splits=splits, num_warps=num_warps, num_stages=num_stages,
                           kernel=decode_kernel)
    return out

  def step(q, k, v, kc, q_start, seg, kv_seg):
    if touch_kb:
      q = touch_pages(q, (k, v), touch_kb)
    if fused:
      return infllmv2_decode_kernels(
          q, k, v, kc[0], cfg, q_start=q_start, kc_coarse=kc[1], segment_ids=seg,
          kv_segment_ids=kv_seg, implementation=implementation, forced_splits=forced_splits,
          num_splits=splits, num_warps=num_warps, num_stages=num_stages, keys_splits=keys_splits,
          keys_num_warps=keys_num_warps, keys_num_stages=keys_num_stages,
          block_windows=keys_windows, scores_num_warps=scores_num_warps,
          decode_kernel=decode_kernel)[:, 0]
    idx, valid = select(q, kc, q_start, seg, kv_seg)
    return attend(q, k, v, idx, valid, q_start, seg, kv_seg)

  return select, attend, step


def _dense_decode(implementation):
  return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                              implementation=implementation))


def decode_rows(seq_lens=(32768, 65536, 131072), *, batch: int = 8,
                configs=("shipped", "issue"), iters: int = 20, num_splits: int | None = None,
                num_warps: int = 4, num_stages: int = 3, segments: bool = True,
                layers: int = 4, step_reps: int = 4, step_programs: int = 4,
                topk_kernel: bool = True,
                keys_kernel: bool = True, keys_splits: int | None = None,
                approximate_lse: bool = False, topk_num_warps: int | None = None,
                fused_select: bool = True, profile: bool = False, selections: dict | None = None,
                quick: bool = False, mosaic: bool = False) -> list[dict]:
  """Times decode at each cache length and selection (a name of `CONFIGS`, or of `selections`
  when given: name -> (init_blocks, local_blocks, topk)); returns bench_decode's rows
  (`attention_row` turns one into bench_attention.json's decode row). mosaic: sparse_decode's
  Mosaic GPU kernel in place of the Triton one (decode_calls')."""
  if quick:
    shapes, geometry = QUICK_SHAPES, QUICK_GEOMETRY
    table, implementation, dense_impls = QUICK_CONFIGS, "interpret", ("xla",)
  else:
    shapes, geometry = SHAPES, GEOMETRY
    table, implementation, dense_impls = CONFIGS, "pallas", ("cudnn", "xla")
  heads, kv_heads, dim, dtype = shapes
  table = selections or table
  unknown = sorted(set(configs) - set(table))
  if unknown:
    raise ValueError(f"decode_rows: configs {unknown} unknown; known: {sorted(table)}")
  itemsize = jnp.dtype(dtype).itemsize
  rows = []
  for seq in map(int, seq_lens):
    # The in-step timing's layers: distinct caches of the same shape (layer 0 is k, v).
    q, q_start, seg, kv_seg, caches = step_inputs(seq, batch, max(layers, 1), shapes, segments)
    k, v = caches[0]
    caches = caches if layers else []

    dense_impl, t_dense, t_dense_step = None, float("nan"), float("nan")
    for impl in dense_impls:
      try:
        t_dense = timeit(_dense_decode(impl), q, k, v, iters=iters)
        dense_impl = impl
        break
      except Exception as e:  # cuDNN may refuse a 1-token query: fall back, and say so
        print(f"dense decode with implementation={impl!r} failed: {type(e).__name__}: {e}")
    if caches and dense_impl:
      dense_call = lambda q, k, v, impl=dense_impl: jax.nn.dot_product_attention(
          q, k, v, implementation=impl)
      t_dense_step = step_time(dense_call, q, caches, reps=step_reps, iters=iters,
                                 programs=step_programs)

    for name in configs:
      init_blocks, local_blocks, topk = table[name]
      cfg = InfLLMv2Config(init_blocks=init_blocks, local_blocks=local_blocks, topk=topk,
                           approximate_lse=approximate_lse, **geometry)

      cache_keys = functools.partial(compressed_cache_keys, cfg=cfg)
      kc = jax.jit(cache_keys)(k)
      splits = num_splits or default_num_splits(batch, kv_heads, topk)

      select, attend, step = decode_calls(
          cfg, seq, implementation=implementation, splits=splits, num_warps=num_warps,
          num_stages=num_stages, topk_kernel=topk_kernel, topk_num_warps=topk_num_warps,
          keys_kernel=keys_kernel, keys_splits=keys_splits, fused_select=fused_select,
          mosaic=mosaic)
      select_jit, attend_jit, step_jit = jax.jit(select), jax.jit(attend), jax.jit(step)
      idx, valid = select_jit(q, kc, q_start, seg, kv_seg)
      t_select = timeit(select_jit, q, kc, q_start, seg, kv_seg, iters=iters)
      t_attend = timeit(attend_jit, q, k, v, idx, valid, q_start, seg, kv_seg, iters=iters)
      t_step = timeit(step_jit, q, k, v, kc, q_start, seg, kv_seg, iters=iters)

      t_step_chained = float("nan")
      if caches:
        layer_args = [(k_, v_, jax.jit(cache_keys)(k_)) for k_, v_ in caches]
        shared = (q_start, seg, kv_seg)
        t_step_chained = step_time(step, q, layer_args, shared, reps=step_reps, iters=iters,
                                   programs=step_programs)

      got = attend_jit(q, k, v, idx, valid, q_start, seg, kv_seg)
      want, _ = jax.jit(lambda q, k, v, idx, valid, lengths: sparse_decode_reference(
          q[:, 0], k, v, idx[:, 0], valid[:, 0], lengths, block_size=cfg.block_size))(
              q, k, v, idx, valid, q_start + 1)
      err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
      # The whole step (the overlapped one included) against attending the same selection.
      step_got = step_jit(q, k, v, kc, q_start, seg, kv_seg)
      step_err = float(jnp.max(jnp.abs(step_got.astype(jnp.float32) - want.astype(jnp.float32))))
      agree = None
      if keys_kernel:  # the kernels' keys against XLA's: the share of identical selections
        xla_idx, _ = jax.jit(lambda q, kc, q_start, seg, kv_seg: select_decode_blocks(
            q, kc[0], cfg, kv_len=seq, q_start=q_start, kc_coarse=kc[1], segment_ids=seg,
            kv_segment_ids=kv_seg, top_blocks_fn=top_blocks_fn(implementation, topk_num_warps)))(
                q, kc, q_start, seg, kv_seg)
        # (the fused selection's rows carry extra -1 columns)
        width = xla_idx.shape[-1]
        agree = float(jnp.mean(jnp.all(xla_idx == idx[..., :width], axis=-1)
                               & jnp.all(idx[..., width:] == -1, axis=-1)))
      selected = int(jnp.sum(valid))  # (row, KV head, block) triples actually attended
      kv_bytes = selected * cfg.block_size * dim * itemsize * 2
      kc_bytes = sum(x.size for x in kc if x is not None) * itemsize
      floor_ms = (kv_bytes + kc_bytes) / HBM_BYTES_PER_S * 1e3
      row = {"seq_len": seq, "batch": batch, "pass": "decode", "config": name, "topk": topk,
             "init_blocks": init_blocks, "local_blocks": local_blocks,
             "sparsejax_ms": t_step, "selection_ms": t_select, "attention_ms": t_attend,
             "cudnn_dense_ms": t_dense, "dense_impl": dense_impl, "floor_ms": floor_ms,
             "speedup_vs_cudnn_dense": t_dense / t_step, "ratio_to_floor": t_step / floor_ms,
             "bytes_read": kv_bytes + kc_bytes,
             "dense_kv_bytes": batch * seq * kv_heads * dim * itemsize * 2,
             "step_sparsejax_ms": t_step_chained, "step_cudnn_dense_ms": t_dense_step,
             "step_speedup_vs_cudnn_dense": t_dense_step / t_step_chained,
             "step_layers": len(caches), "step_reps": step_reps,
             "step_programs": step_programs,
             "topk_kernel": topk_kernel, "topk_num_warps": topk_num_warps,
             "keys_kernel": keys_kernel, "fused_select": fused_select,
             "keys_splits": keys_splits if keys_kernel else None,
             "approximate_lse": approximate_lse,
             "selections_equal_to_xla_keys": agree,
             "num_splits": splits, "segments": segments, "max_abs_err_vs_reference": err,
             # The timed step's forced-block programs per row and KV head (0: select, then
             # attend every block), as the layer picks them.
             "forced_splits": (resolve_forced_splits(batch, kv_heads, cfg)
                               if keys_kernel and topk_kernel and fused_select else 0),
             "step_max_abs_err_vs_reference": step_err,
             "decode_kernel": "mosaic" if mosaic else "triton",
             "implementation": implementation}
      if profile and caches:  # per decode call: the in-step programs' kernels, by name
        where = (dict(process_prefix="/host:CPU", thread_contains="XLAPjRtCpuClient") if quick
                 else {})
        runs = dict(sparse=(chained(step, step_reps), layer_args, shared))
        if dense_impl:
          runs["dense"] = (chained(dense_call, step_reps), caches, ())
        row["profile"] = {}
        for kind, (program, program_layers, program_shared) in runs.items():
          p = profiling.kernel_times(program, q, program_layers, program_shared, reps=3,
                                     calls_per_run=step_reps * len(caches), **where)
          row["profile"][kind] = {"summary": p["summary"], "kernels": p["kernels"][:40]}
        # Kernel time per step: steadier than the in-step wall time, which moved by +-10 us
        # between processes running the same code (experiments/results/decode_step_1207d.md).
        kernel_us = {kind: v["summary"]["kernel_us"] for kind, v in row["profile"].items()}
        row["step_kernel_us"] = kernel_us
        if "dense" in kernel_us:
          row["step_kernel_speedup_vs_cudnn_dense"] = kernel_us["dense"] / kernel_us["sparse"]
      print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
      rows.append(row)
  return rows


def attention_row(row: dict) -> dict:
  """A `decode_rows` row in bench_attention.json's schema: sparsejax_ms, cudnn_dense_ms and
  speedup_vs_cudnn_dense are the in-step times (as a model's decode step runs, the issue's
  decode target); the per-call wall times, which pay a host dispatch each, keep their values as
  call_sparsejax_ms and call_cudnn_dense_ms; the rest stays."""
  renamed = {("call_" + k if k in ("sparsejax_ms", "cudnn_dense_ms") else k): v
             for k, v in row.items() if k != "speedup_vs_cudnn_dense"}
  return {**renamed, "sparsejax_ms": row["step_sparsejax_ms"],
          "cudnn_dense_ms": row["step_cudnn_dense_ms"],
          "speedup_vs_cudnn_dense": row["step_speedup_vs_cudnn_dense"],
          "ratio_to_floor": row["step_sparsejax_ms"] / row["floor_ms"]}


def write_results(rows, out: str, *, quick: bool = False):
  """Writes `<out>.json` (device, jax version, shapes, rows) and `<out>.md` (a table)."""
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "shapes": ({"heads": 4, "kv_heads": 2, "head_dim": 16, "dtype": "float32",
                        "block": 16} if quick else
                       {"heads": 32, "kv_heads": 2, "head_dim": 128, "dtype": "bfloat16",
                        "block": 64, "compress": [32, 16], "dense_len": 8192}),
            "kernel": "the step as the layer runs it: pallas_kernels/infllmv2_decode (Triton "
                      "lowering): block_scores' decode kernels select from the cached "
                      "compressed keys (top-k in the scores kernel) while its forced_splits "
                      "programs attend the forced blocks; sparse_decode attends the rest and "
                      "merges the partials",
            "floor": f"bytes read at {HBM_BYTES_PER_S / 1e12} TB/s",
            "rows": rows}
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(out + ".md", "w") as f:
    f.write(f"# Decode benchmark ({result['device']}, jax {result['jax']})\n\n")
    f.write("| seq | batch | config (topk) | sparsejax ms | selection ms | attention ms | "
            "dense ms (impl) | floor ms | speedup vs dense | / floor | in-step sparsejax ms | "
            "in-step dense ms | in-step speedup |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
      lse = ", coarse LSE" if r.get("approximate_lse") else ""
      f.write(f"| {r['seq_len']} | {r['batch']} | {r['config']} ({r['topk']}{lse}) | "
              f"{r['sparsejax_ms']:.3f} | {r['selection_ms']:.3f} | {r['attention_ms']:.3f} | "
              f"{r['cudnn_dense_ms']:.3f} ({r['dense_impl']}) | {r['floor_ms']:.4g} | "
              f"{r['speedup_vs_cudnn_dense']:.2f}x | {r['ratio_to_floor']:.3g}x | "
              f"{r['step_sparsejax_ms']:.3f} | {r['step_cudnn_dense_ms']:.3f} | "
              f"{r['step_speedup_vs_cudnn_dense']:.2f}x |\n")
    f.write(f"\nIn-step: {rows[0]['step_layers'] if rows else 0} distinct caches x "
            f"{rows[0]['step_reps'] if rows else 0} passes chained in one jitted program, per "
            "call (experiments/bench_decode.py says why).\n")
    for r in rows:
      if "step_kernel_speedup_vs_cudnn_dense" in r:
        k = r["step_kernel_us"]
        f.write(f"\nKernel time per step, profiled ({r['seq_len']} tokens, {r['config']}): "
                f"sparsejax {k['sparse']:.1f} us, dense {k['dense']:.1f} us, "
                f"{r['step_kernel_speedup_vs_cudnn_dense']:.2f}x.\n")
  profiled = [r for r in rows if "profile" in r]
  if profiled:
    with open(out + "_profile.md", "w") as f:
      f.write(f"# Decode kernels, per decode call ({result['device']}, jax {result['jax']})\n\n"
              "The in-step programs of the rows (experiments/profiling.py): per-kernel device "
              "time from a jax.profiler trace, divided by the decode calls.\n\n")
      for r in profiled:
        for kind, p in r["profile"].items():
          f.write(profiling.markdown(p, f"{r['seq_len']} tokens, batch {r['batch']}, "
                                        f"{r['config']} (top {r['topk']}): {kind}") + "\n")
