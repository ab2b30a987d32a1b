"""Attention benchmark on the GPU: cuDNN dense, the cuDNN sliding window of the same visible-token
count (the floor), and sparsejax's InfLLM-V2 path.

  python -m experiments.bench_attention --seq_lens=32768,65536,131072 --out=experiments/results/bench_attention

Shapes: batch 1, 32 query heads, 2 KV heads, head dim 128, bf16, causal; `--topk` blocks of 64 per
query and KV head in all (init 1 + local 32 + the best others: the issue's configuration).
Passes:
  attn_only  the block-sparse forward kernel given indices: a synthetic InfLLM-V2-shaped selection
             (per query block of 64 tokens the init block, the local blocks and random earlier
             blocks, the same for every token of the query block).
  fwd        selection included: the fused block-scoring kernel (`--approximate_lse`, as the
             released CUDA kernels run stage 1), top-k with forced blocks, the index build and the
             sparse forward kernel, on inputs whose queries share a direction within each query
             block (`structured_inputs`), so that adjacent tokens pick similar blocks as in a
             trained model; i.i.d. random queries would make every token of a query block pick
             different blocks and the per-query-block unions (what the kernel visits) explode.
  fwd_bwd    the same plus the backward kernels (selection has no gradient).
  decode     `--decode_batch` rows of one query token against a full cache of seq_len: selection
             from the cached compressed keys, top-k, the sparse decode kernel, timed in-step as a
             model's decode step runs (4 layers' caches x 4 passes in one program, 4 programs a
             sample) against cuDNN dense decode timed the same way (experiments/bench_decode.py
             says more; `decode_timing.attention_row` maps its row here).

`--tune` first sweeps, at `--tune_seq_len`, the scoring kernel's tunables (`--tune_score_grid`,
timing the scoring alone) and each attention kernel's Triton launch (`--tune_launch_grid`: the
forward timed alone, then dq and dk/dv one at a time inside forward + backward), and runs the rows
with the fastest of each; the sweep goes into the JSON as `tuning`.
"""
import inspect
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import decode_timing, profiling, timing

from pallas_kernels.block_scores import block_scores, score_and_select
from pallas_kernels.sparse_attention import Launch, sparse_attention
from pallas_kernels.sparse_attention import forward_mosaic
from pallas_kernels.sparse_attention.forward import sparse_attention_forward
from pallas_kernels.sparse_attention.index import (next_power_of_2, query_block_unions,
                                                   union_token_bits)
from pallas_kernels.sparse_attention.op import resolve_forward_kernel
from sparsejax.layers.infllmv2 import heads_per_program
from sparsejax.ops.infllmv2 import InfLLMv2Config

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "65536", "131072"], "Sequence lengths.")
_TOPK = flags.DEFINE_integer("topk", 64, "Blocks per query (init + local + others).")
_LOCAL = flags.DEFINE_integer("local_blocks", 32, "Local blocks (2048 tokens).")
_BLOCK = flags.DEFINE_integer("block", 64, "Block size (tokens).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "", "Output path stem (.json and .md).")
_NUM_WARPS = flags.DEFINE_integer("num_warps", 4, "Triton warps of the attn_only forward kernel.")
_NUM_STAGES = flags.DEFINE_integer("num_stages", 2, "Triton pipelining stages of the attn_only "
                                   "forward kernel.")
_LAUNCH = flags.DEFINE_string(
    "launch", "", "num_warps x num_stages of the sparse attention kernels in the fwd/fwd_bwd rows, "
    "and the dk/dv kernel's query tiles per program, e.g. 'forward=4x3,dq=4x2,dkdv_chunk=512'; "
    "those left out keep the op's defaults (`Launch`).")
_PASSES = flags.DEFINE_list("passes", ["attn_only", "fwd", "fwd_bwd", "decode"],
                            "Which rows to measure.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 8, "Rows of the decode pass (one query "
                                     "token each, a full cache of seq_len).")
_DECODE_KERNEL = flags.DEFINE_enum(
    "decode_kernel", "triton", ["triton", "mosaic"],
    "sparse_decode's kernel in the decode pass (`sparse_decode(kernel=...)`).")
_APPROX = flags.DEFINE_bool("approximate_lse", True, "Stage-1 normaliser over the coarse keys.")
_ATTN_BLOCK_Q = flags.DEFINE_integer(
    "attn_block_q", None, "Query tokens per program of the sparse attention kernels (fwd/fwd_bwd): "
    "fewer tokens make smaller unions of per-token selections, with smaller tiles. Default: the "
    "op's (64 / heads_per_program).")
_HEADS_PER_PROGRAM = flags.DEFINE_integer(
    "heads_per_program", None, "Query heads of one KV head per forward program (fwd/fwd_bwd): "
    "their (token, head) pairs are the tile rows, so each program spans 64 / heads_per_program "
    "tokens. Default: the InfLLM-V2 layer's choice (16 for these 16-head groups).")
_SCORE_OPTIONS = flags.DEFINE_string(
    "score_options", "", "Tunables of the block-scoring kernel (pallas_kernels/block_scores), "
    "e.g. 'block_rows=128,num_warps=8'; those left out keep the op's defaults.")
_TOPK_KERNEL = flags.DEFINE_bool(
    "topk_kernel", True, "Select with the sort-free top-k kernel (pallas_kernels/block_topk), as "
    "the InfLLM-V2 layer does, instead of XLA's top_k and sort in the fwd/fwd_bwd rows. Either "
    "way the other one's selection time and whether both selections agree are recorded.")
_TUNE = flags.DEFINE_bool("tune", False, "Sweep the kernels' tunables first; rows use the best.")
_TUNE_SEQ_LEN = flags.DEFINE_integer("tune_seq_len", 65536, "Sequence length of the sweep.")
_TUNE_SCORE_GRID = flags.DEFINE_string(
    "tune_score_grid", "block_rows=64|128|256,block_windows=64|128,num_warps=4|8,num_stages=2|3",
    "Scoring-kernel options to sweep (every combination).")
_TUNE_LAUNCH_GRID = flags.DEFINE_list("tune_launch_grid", ["4x2", "4x3", "8x2", "8x3"],
                                      "num_warps x num_stages per attention kernel to sweep.")
_TUNE_BLOCK_Q = flags.DEFINE_list(
    "tune_block_q", [], "Query tokens per attention tile to sweep first (forward + backward "
    "decides; e.g. 1,2,4: one token's heads per tile has no union overhead, but 16-row tiles).")
_TUNE_DKDV_CHUNK = flags.DEFINE_list(
    "tune_dkdv_chunk", [], "Query tiles per dk/dv program to sweep last (Launch.dkdv_chunk; one "
    "larger than q_len / block_q is one program per key block, as before 2026-12-06).")
_PROFILE = flags.DEFINE_bool("profile", False, "Also trace the fwd/fwd_bwd rows' calls and write "
                             "per-kernel device times to <out>_profile.md and the rows.")
HEADS, KV_HEADS, DIM = 32, 2, 128


def parse_options(text: str) -> dict[str, int]:
  """'a=1,b=2' -> {'a': 1, 'b': 2}, over the scoring kernel's defaults (so rows record them)."""
  defaults = {name: p.default for name, p in inspect.signature(block_scores).parameters.items()
              if name in ("block_rows", "block_windows", "num_warps", "num_stages")}
  try:
    given = {key.strip(): int(value) for key, value in
             (item.split("=") for item in text.split(",") if item.strip())}
  except ValueError as e:
    raise ValueError(f"expected 'name=int,...', got {text!r}") from e
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"--score_options: unknown {unknown}; known: {sorted(defaults)}")
  return {**defaults, **given}


def parse_pair(text: str) -> tuple[int, int]:
  """'8x3' -> (8, 3): num_warps x num_stages."""
  parts = text.strip().split("x")
  if len(parts) != 2 or not all(p.isdigit() for p in parts):
    raise ValueError(f"expected num_warps x num_stages like '4x2', got {text!r}")
  return int(parts[0]), int(parts[1])


def parse_launch(text: str) -> Launch:
  """'forward=4x2,dq=8x3,dkdv=4x2,dkdv_chunk=512,dq_atomic=1,forward_kernel=mosaic,
  mosaic_stages=3,dkdv_kernel=mosaic,mosaic_dkdv_stages=4' -> Launch (those left out keep
  their defaults)."""
  given = {}
  kernels = "|".join(Launch.FORWARD_KERNELS)
  for item in filter(None, (x.strip() for x in text.split(","))):
    name, _, value = item.partition("=")
    if name in ("dkdv_chunk", "mosaic_stages", "mosaic_dkdv_stages") and value.isdigit():
      given[name] = int(value)
    elif name == "dq_atomic" and value in ("0", "1"):
      given[name] = value == "1"
    elif name in ("forward_kernel", "dkdv_kernel") and value in Launch.FORWARD_KERNELS:
      given[name] = value
    elif name in Launch.KERNELS:
      given[name] = parse_pair(value)
    else:
      raise ValueError(f"--launch: expected one of {Launch.KERNELS} =WxS, dkdv_chunk=N, "
                       f"dq_atomic=0|1, forward_kernel={kernels}, dkdv_kernel={kernels}, "
                       f"mosaic_stages=N or mosaic_dkdv_stages=N, got {item!r}")
  return Launch(**given)


def parse_grid(text: str) -> list[dict[str, int]]:
  """'a=1|2,b=3' -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]: every combination."""
  axes = {}
  for item in filter(None, (x.strip() for x in text.split(","))):
    name, _, values = item.partition("=")
    if not values:
      raise ValueError(f"expected 'name=v1|v2,...', got {text!r}")
    axes[name] = [int(v) for v in values.split("|")]
  return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def timeit(fn, *args):
  return timing.timeit(fn, *args, iters=_ITERS.value)


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


def structured_inputs(seq, key):
  """q, k, v [1, seq, heads|kv_heads, 128] bf16; each query block of 64 tokens shares a random
  direction per head (plus noise of half its size)."""
  keys = jax.random.split(key, 4)
  shared = jax.random.normal(keys[0], (1, seq // 64, 1, HEADS, DIM))
  noise = jax.random.normal(keys[1], (1, seq // 64, 64, HEADS, DIM))
  q = (shared + 0.5 * noise).reshape(1, seq, HEADS, DIM).astype(jnp.bfloat16)
  k = jax.random.normal(keys[2], (1, seq, KV_HEADS, DIM), jnp.bfloat16)
  v = jax.random.normal(keys[3], (1, seq, KV_HEADS, DIM), jnp.bfloat16)
  return q, k, v


def row(seq, name, t_kernel, t_dense, t_window, flops, **extra):
  """One result row; flops is the work the kernel does (backward counted as 2.5x forward)."""
  return {"seq_len": seq, "batch": 1, "pass": name, "sparsejax_ms": t_kernel,
          "cudnn_dense_ms": t_dense, "floor_ms": t_window,
          "speedup_vs_cudnn_dense": t_dense / t_kernel, "ratio_to_floor": t_kernel / t_window,
          "kernel_tflops": flops / t_kernel / 1e9, "floor_tflops": flops / t_window / 1e9, **extra}


def tune(cfg, topk_impl, block_q, hp):
  """`--tune`'s sweep at --tune_seq_len: (best score options, best Launch, best block_q, the
  records)."""
  seq = _TUNE_SEQ_LEN.value
  q, k, v = structured_inputs(seq, jax.random.key(seq))
  w = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
  records = []

  def measure(kernel, options, fn, *args):
    record = {"seq_len": seq, "kernel": kernel, "options": options}
    try:
      record["ms"] = timeit(jax.jit(fn), *args)
    except Exception as e:  # a setting that does not compile (registers, shared memory) is skipped
      record["error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(record), flush=True)
    records.append(record)

  def best(kernel):
    done = [r for r in records if r["kernel"] == kernel and "ms" in r]
    if not done:
      raise RuntimeError(f"--tune: no {kernel} setting compiled; see the records above")
    return min(done, key=lambda r: r["ms"])["options"]

  for options in parse_grid(_TUNE_SCORE_GRID.value):
    measure("scores", options, lambda q, k, o=options: block_scores(q, k, cfg, **o), q, k)
  opts = best("scores")
  idx, valid = jax.jit(lambda q, k: score_and_select(q, k, cfg, topk_implementation=topk_impl,
                                                      **opts))(q, k)

  def attend(launch, tokens=None):
    return lambda q, k, v, idx, valid: sparse_attention(
        q, k, v, idx, valid, block_size=_BLOCK.value, block_q=tokens or block_q,
        heads_per_program=hp, launch=launch)[0]

  def grads(launch, tokens=None):
    return jax.grad(lambda q, k, v, idx, valid, w: jnp.sum(
        attend(launch, tokens)(q, k, v, idx, valid).astype(jnp.float32) * w), (0, 1, 2))

  for tokens in map(int, _TUNE_BLOCK_Q.value):  # the tile first: the launches depend on it
    record = len(records)
    measure("block_q_fwd", tokens, attend(Launch(), tokens), q, k, v, idx, valid)
    measure("block_q", tokens, grads(Launch(), tokens), q, k, v, idx, valid, w)
    unions = query_block_unions(idx, valid, num_kv_blocks=seq // _BLOCK.value, block_q=tokens)
    records[record]["mean_union_blocks"] = float(jnp.mean(unions[..., 0].astype(jnp.float32)))
  if _TUNE_BLOCK_Q.value:
    block_q = best("block_q")
  launch = Launch()
  for kernel in Launch.KERNELS:  # one kernel at a time, the others at their best so far
    for pair in map(parse_pair, _TUNE_LAUNCH_GRID.value):
      trial = launch._replace(**{kernel: pair})
      if kernel == "forward":
        measure(kernel, list(pair), attend(trial), q, k, v, idx, valid)
      else:
        measure(kernel, list(pair), grads(trial), q, k, v, idx, valid, w)
    launch = launch._replace(**{kernel: tuple(best(kernel))})
  for chunk in map(int, _TUNE_DKDV_CHUNK.value):
    measure("dkdv_chunk", chunk, grads(launch._replace(dkdv_chunk=chunk)), q, k, v, idx, valid, w)
  if _TUNE_DKDV_CHUNK.value:
    launch = launch._replace(dkdv_chunk=best("dkdv_chunk"))
  # The launch changes the schedule, not the arithmetic (a different dkdv_chunk only reorders
  # dK / dV's fp32 partial sums): the tuned kernels against the defaults.
  new = jax.jit(grads(launch))(q, k, v, idx, valid, w)
  old = jax.jit(grads(Launch()))(q, k, v, idx, valid, w)
  diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
             for a, b in zip(new, old))
  records.append({"seq_len": seq, "kernel": "check", "max_abs_grad_diff_vs_default": diff})
  print(json.dumps(records[-1]), flush=True)
  return opts, launch, block_q, records


def uses_mosaic(launch, q, k, hp) -> bool:
  """Whether the op's forward (as launched, one document per row) is the Mosaic kernel."""
  return resolve_forward_kernel(launch, q, k, hp, _BLOCK.value, implementation="pallas",
                                packed=False, poison=False) == "mosaic"


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  rows = []
  opts, launch, tuning = parse_options(_SCORE_OPTIONS.value), parse_launch(_LAUNCH.value), []
  cfg = InfLLMv2Config(block_size=_BLOCK.value, init_blocks=1, local_blocks=_LOCAL.value,
                       topk=_TOPK.value, dense_len=0, approximate_lse=_APPROX.value)
  topk_impl = "pallas" if _TOPK_KERNEL.value else "reference"
  hp = heads_per_program(_HEADS_PER_PROGRAM.value, HEADS // KV_HEADS)
  block_q = _ATTN_BLOCK_Q.value or (64 if hp == 1 else 64 // hp)
  if _TUNE.value:
    opts, launch, block_q, tuning = tune(cfg, topk_impl, block_q, hp)
    print(json.dumps({"tuned_score_options": opts, "tuned_launch": launch._asdict(),
                      "tuned_block_q": block_q}), flush=True)
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
      seg = jnp.ones((1, seq), jnp.int32)
      if uses_mosaic(launch, q, k, hp):   # the forward the fwd rows run: the Mosaic kernel's index
        tokens = forward_mosaic.tile_tokens(hp)
        build_index = jax.jit(lambda idx: union_token_bits(
            idx, idx >= 0, num_kv_blocks=seq // _BLOCK.value, tile_tokens=tokens))
        kernel = jax.jit(lambda q, k, v, idx, index: forward_mosaic.sparse_attention_forward_mosaic(
            q, k, v, *index, block_k=_BLOCK.value, heads_per_program=hp,
            stages=launch.mosaic_stages)[0])
      else:
        build_index = jax.jit(lambda idx: query_block_unions(
            idx, idx >= 0, num_kv_blocks=seq // _BLOCK.value, block_q=_BLOCK.value))
        kernel = jax.jit(lambda q, k, v, idx, unions: sparse_attention_forward(
            q, k, v, idx, seg, seg, unions, block_q=_BLOCK.value, block_k=_BLOCK.value,
            num_warps=_NUM_WARPS.value, num_stages=_NUM_STAGES.value)[0])
      unions = build_index(idx)
      t_kernel, t_index = timeit(kernel, q, k, v, idx, unions), timeit(build_index, idx)
      rows.append(row(seq, "attn_only", t_kernel, t_dense, t_window, flops, index_build_ms=t_index))
    if {"fwd", "fwd_bwd"} & set(_PASSES.value):
      q, k, v = structured_inputs(seq, keys[0])
      select = jax.jit(lambda q, k: score_and_select(q, k, cfg, topk_implementation=topk_impl,
                                                      **opts))
      attend = lambda q, k, v, idx, valid: sparse_attention(
          q, k, v, idx, valid, block_size=_BLOCK.value, block_q=block_q, heads_per_program=hp,
          launch=launch)[0]
      idx, valid = select(q, k)
      unions = query_block_unions(idx, valid, num_kv_blocks=seq // _BLOCK.value,
                                  block_q=block_q)[..., 0]
      other = "reference" if _TOPK_KERNEL.value else "pallas"
      select_other = jax.jit(lambda q, k: score_and_select(q, k, cfg, topk_implementation=other,
                                                            **opts))
      try:  # the alternative top-k, timed and checked against the one the rows use
        other_idx, other_valid = select_other(q, k)
        compare_topk = dict(
            other_topk=other, selection_other_topk_ms=timeit(select_other, q, k),
            topk_implementations_agree=bool(jnp.array_equal(other_idx, idx)
                                            & jnp.array_equal(other_valid, valid)))
      except Exception as e:  # a kernel that does not lower must not cost the other rows
        compare_topk = dict(other_topk=other, other_topk_error=f"{type(e).__name__}: {e}"[:400])
      print(json.dumps({"seq_len": seq, "topk": topk_impl, **compare_topk}), flush=True)
      parts = dict(
          topk_implementation=topk_impl, **compare_topk,
          scores_ms=timeit(jax.jit(lambda q, k: block_scores(q, k, cfg, **opts)), q, k),
          selection_ms=timeit(select, q, k),
          attention_given_selection_ms=timeit(jax.jit(attend), q, k, v, idx, valid),
          mean_union_blocks=float(jnp.mean(unions.astype(jnp.float32))),
          approximate_lse=_APPROX.value, score_options=opts, attn_block_q=block_q,
          heads_per_program=hp, launch=launch._asdict())
      full = lambda q, k, v: attend(q, k, v, *score_and_select(
          q, k, cfg, topk_implementation=topk_impl, **opts))
      if "fwd" in _PASSES.value:
        rows.append(row(seq, "fwd", timeit(jax.jit(full), q, k, v), t_dense, t_window, flops,
                        **parts))
        if _PROFILE.value:
          rows[-1]["profile"] = profiling.kernel_times(jax.jit(full), q, k, v, reps=2)
      if "fwd_bwd" in _PASSES.value:
        w = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
        grad = lambda f: jax.jit(jax.grad(
            lambda q, k, v, w: jnp.sum(f(q, k, v).astype(jnp.float32) * w), (0, 1, 2)))
        dense_f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                               implementation="cudnn")
        window_f = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(visible - 1, 0), implementation="cudnn")
        given = jax.jit(jax.grad(lambda q, k, v, idx, valid, w: jnp.sum(
            attend(q, k, v, idx, valid).astype(jnp.float32) * w), (0, 1, 2)))
        rows.append(row(seq, "fwd_bwd", timeit(grad(full), q, k, v, w),
                        timeit(grad(dense_f), q, k, v, w), timeit(grad(window_f), q, k, v, w),
                        3.5 * flops, **parts,
                        fwd_bwd_given_selection_ms=timeit(given, q, k, v, idx, valid, w)))
        if _PROFILE.value:
          rows[-1]["profile"] = profiling.kernel_times(grad(full), q, k, v, w, reps=2)
    if "decode" in _PASSES.value:
      decode = decode_timing.decode_rows(
          [seq], batch=_DECODE_BATCH.value, configs=("issue",), iters=_ITERS.value,
          selections={"issue": (1, _LOCAL.value, _TOPK.value)}, profile=_PROFILE.value,
          mosaic=_DECODE_KERNEL.value == "mosaic")
      rows += [decode_timing.attention_row(r) for r in decode]
    for r in rows:
      if r["seq_len"] == seq:
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
    # After every length, so a run cut short by a device call's time limit keeps its rows.
    write_outputs(rows, tuning)


def write_outputs(rows, tuning):
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "dtype": "bfloat16",
                       "block": _BLOCK.value, "topk": _TOPK.value,
                       "local_blocks": _LOCAL.value},
            "kernel": ("pallas_kernels/sparse_attention: the forward (Mosaic GPU on Hopper, else "
                       "Triton); fwd_bwd adds the dq (Triton) and dk/dv (Mosaic on Hopper) "
                       "kernels (Launch says which ran)"),
            "num_warps": _NUM_WARPS.value, "num_stages": _NUM_STAGES.value, "rows": rows,
            "tuning": tuning}
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(_OUT.value + ".md", "w") as f:
      f.write(f"# Attention benchmark ({result['device']}, jax {result['jax']})\n\n")
      f.write("| seq | pass | sparsejax ms | of which scoring / top-k / attention ms | "
              "cuDNN dense ms | floor (cuDNN window) ms | speedup vs dense | vs floor | "
              "TFLOP/s | mean union blocks |\n|---|---|---|---|---|---|---|---|---|---|\n")
      for r in rows:
        if r["pass"] == "decode":
          f.write(f"| {r['seq_len']} | decode, batch {r['batch']}, in-step | "
                  f"{r['sparsejax_ms']:.4f} | per call: selection {r['selection_ms']:.3f} / "
                  f"attention {r['attention_ms']:.3f} (each with its dispatch) | "
                  f"{r['cudnn_dense_ms']:.4f} | {r['floor_ms']:.4f} (bytes at 3.35 TB/s) | "
                  f"{r['speedup_vs_cudnn_dense']:.2f}x | {r['ratio_to_floor']:.2f}x | - | - |\n")
          continue
        if "selection_ms" in r:
          attention = r.get("fwd_bwd_given_selection_ms", r["attention_given_selection_ms"])
          parts = (f"{r['scores_ms']:.2f} / {r['selection_ms'] - r['scores_ms']:.2f} / "
                   f"{attention:.2f}")
        else:
          parts = f"index {r['index_build_ms']:.2f} (selection given)"
        f.write(f"| {r['seq_len']} | {r['pass']} | {r['sparsejax_ms']:.2f} | {parts} | "
                f"{r['cudnn_dense_ms']:.2f} | {r['floor_ms']:.2f} | "
                f"{r['speedup_vs_cudnn_dense']:.2f}x | {r['ratio_to_floor']:.2f}x | "
                f"{r['kernel_tflops']:.0f} | {r.get('mean_union_blocks', float('nan')):.0f} |\n")
    profiled = [r for r in rows if "profile" in r]
    if profiled:
      with open(_OUT.value + "_profile.md", "w") as f:
        f.write(f"# Attention kernels ({result['device']}, jax {result['jax']})\n\n"
                "Per-kernel device time of the rows' calls from a jax.profiler trace "
                "(experiments/profiling.py).\n\n")
        for r in profiled:
          # A decode row holds two profiles (its in-step programs, sparse and dense).
          parts = r["profile"].items() if r["pass"] == "decode" else [("", r["profile"])]
          for kind, p in parts:
            title = f"{r['seq_len']} tokens, {r['pass']}" + (f", {kind}" if kind else "")
            f.write(profiling.markdown(p, title) + "\n")


if __name__ == "__main__":
  app.run(main)
