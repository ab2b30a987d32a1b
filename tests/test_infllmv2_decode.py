"""InfLLM-V2 decoding from compressed keys kept in the KV cache: the incremental update, the jnp
decode against `infllmv2_attention`, the Pallas decode kernel and the whole kernel step
(pallas_kernels/infllmv2_decode; interpret mode) against the jnp decode, generation through the
model, bad inputs and the benchmark's smoke mode."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.block_scores import decode_selection_keys
from pallas_kernels.infllmv2_decode import infllmv2_decode as infllmv2_decode_kernels
from pallas_kernels.sparse_decode import sparse_decode
from sparsejax.model import DecoderLM
from sparsejax.inference import generate
from sparsejax.layers.kv_cache import KVCache, write_rows
from sparsejax.ops import infllmv2
from sparsejax.ops.infllmv2 import InfLLMv2Config, compress_keys, num_windows
from tests.test_infllmv2_layer import with_params_of
from tests.test_model import small_config

# Jitted once per shape: eager dispatch of these many small ops costs more than compiling.
infllmv2_attention = jax.jit(infllmv2.infllmv2_attention, static_argnames="cfg")
infllmv2_decode = jax.jit(infllmv2.infllmv2_decode, static_argnames="cfg")
select_decode_blocks = jax.jit(infllmv2.select_decode_blocks, static_argnames=("cfg", "kv_len"))
decode_step_kernels = jax.jit(infllmv2_decode_kernels, static_argnames=(
    "cfg", "implementation", "forced_splits", "num_splits"))

# Blocks of 16 (the kernel's minimum), windows 8 every 4: a 75-slot cache spans 5 blocks.
CFG = InfLLMv2Config(block_size=16, compress_window=8, compress_stride=4, init_blocks=1,
                     local_blocks=1, topk=3, lse_window=16, lse_stride=8, dense_len=32)


def rand(seed, *shapes):
  """float32 normal arrays (numpy's generator: jax.random would compile once per shape)."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]


# ---------------------------------------------------------------------------------------------
# Incremental compressed keys


GEOMETRIES = ((8, 4), (7, 3))  # (window, stride); the second: window % stride != 0


@jax.jit
def _write(kcs, cache, new, offsets):
  cache = write_rows(cache, new, offsets)
  kcs = tuple(infllmv2.update_compressed_keys(kc, cache, offsets, new.shape[1], window=w, stride=s)
              for kc, (w, s) in zip(kcs, GEOMETRIES))
  return kcs, cache


_compress = jax.jit(compress_keys, static_argnames=("window", "stride"))


def _check_visible_windows(kcs, cache, lengths):
  """Every window a query at position length - 1 may see equals compress_keys of the cache."""
  for kc, (w, s) in zip(kcs, GEOMETRIES):
    full = np.asarray(_compress(cache, window=w, stride=s))
    last = np.arange(kc.shape[1]) * s + w - 1
    for row, length in enumerate(lengths):
      visible = last < length
      np.testing.assert_allclose(np.asarray(kc)[row, visible], full[row, visible], rtol=1e-6,
                                 atol=1e-6)


def test_incremental_compressed_keys_equal_compress_keys_with_padding_overwritten():
  capacity, width = 70, 40
  lengths = np.array([13, 40, 5], np.int32)  # right-padded prompts of a generate() batch
  (cache, prompt, pad) = rand(0, (3, capacity, 2, 8), (3, width, 2, 8), (3, width, 2, 8))
  in_prompt = np.arange(width)[None, :, None, None] < lengths[:, None, None, None]
  prompt = jnp.where(in_prompt, prompt, 5.0 + pad)  # the padding's keys: far from the real ones
  kcs = tuple(jnp.zeros((3, num_windows(capacity, w, s), 2, 8)) for w, s in GEOMETRIES)
  kcs, cache = _write(kcs, cache, prompt, jnp.zeros(3, jnp.int32))
  _check_visible_windows(kcs, cache, [width] * 3)  # the prefill wrote every window it completed
  after_prefill = np.asarray(kcs[0])

  # generate() resets the lengths: the continuation overwrites the padding.
  stale = {(r, i) for r in range(3) for i in range(kcs[0].shape[1])
           if lengths[r] <= i * 4 + 7 < width}
  offsets = jnp.asarray(lengths)
  chunks = [1] * 6 + [7] + [1] * 2  # decode steps, and one multi-token write
  for step, t in enumerate(chunks):
    (new,) = rand(100 + step, (3, t, 2, 8))
    kcs, cache = _write(kcs, cache, new, offsets)
    offsets = offsets + t
    _check_visible_windows(kcs, cache, np.asarray(offsets))
  # The windows that were computed over padding are visible now, and were recomputed.
  now_visible = {(r, i) for (r, i) in stale if i * 4 + 7 < int(offsets[r])}
  assert len(now_visible) >= 8
  fresh = np.asarray(_compress(cache, window=8, stride=4))
  for r, i in now_visible:
    assert not np.allclose(after_prefill[r, i], fresh[r, i], atol=0.1)  # it held padding
    np.testing.assert_allclose(np.asarray(kcs[0])[r, i], fresh[r, i], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The jnp decode against infllmv2_attention, and the Pallas kernel (interpret) against both


@functools.partial(jax.jit, static_argnames=("cfg", "implementation", "num_splits",
                                             "keys_kernel"))
def kernel_decode(q, k, v, kc, q_start, seg, kv_seg, kc_coarse, *, cfg, implementation,
                  num_splits, keys_kernel=False):
  """What the layer runs on a GPU: selection from the cached keys (keys_kernel: by the decode
  selection-key kernels), then the decode kernel."""
  keys_fn = (functools.partial(decode_selection_keys, implementation=implementation)
             if keys_kernel else None)
  idx, valid = infllmv2.select_decode_blocks(q, kc, cfg, kv_len=k.shape[1], q_start=q_start,
                                             kc_coarse=kc_coarse, segment_ids=seg,
                                             kv_segment_ids=kv_seg, selection_keys_fn=keys_fn)
  return sparse_decode(q[:, 0], k, v, idx[:, 0], valid[:, 0], q_start + 1,
                       block_size=cfg.block_size,
                       q_segment_ids=None if seg is None else seg[:, 0], kv_segment_ids=kv_seg,
                       implementation=implementation, num_splits=num_splits,
                       poison_outputs=True)


def _decode_inputs(heads, kv_heads, dim, capacity, packed, seed=0):
  q, k, v = rand(seed, (2, 1, heads, dim), (2, capacity, kv_heads, dim),
                 (2, capacity, kv_heads, dim))
  # Row 0 decodes at the end of its cache, row 1 a third in (below dense_len=32: dense fallback).
  q_start = jnp.array([capacity - 1, capacity // 3], jnp.int32)
  seg = kv_seg = None
  if packed:  # row 0: the query's document (2) starts at token 10 and spans 4+ blocks
    kv_seg = jnp.array([[1] * 10 + [2] * (capacity - 10), [1] * capacity], jnp.int32)
    seg = jnp.array([[2], [1]], jnp.int32)
  return q, k, v, q_start, seg, kv_seg


@functools.partial(jax.jit, static_argnames="cfg")
def _cached_keys(k, q_start, cfg):
  """compress_keys at both geometries, with every window past a row's query POISONED: such
  windows (padding not yet overwritten, future tokens) must never enter the result."""
  kcs = []
  for w, s in ((cfg.compress_window, cfg.compress_stride), (cfg.lse_window, cfg.lse_stride)):
    kc = compress_keys(k, window=w, stride=s)
    last = jnp.arange(kc.shape[1]) * s + w - 1
    kcs.append(jnp.where((last[None, :] > q_start[:, None])[:, :, None, None], 1e3, kc))
  return kcs


DECODE_CASES = [  # heads, kv_heads, dim, capacity, approximate_lse, packed, topk, num_splits
    (2, 2, 16, 75, False, False, 3, 2),     # GQA 1, capacity not a multiple of the block
    (4, 2, 16, 75, True, True, 3, None),    # GQA 2, LSE approximation, packed, default splits
    (16, 1, 32, 64, False, True, 4, 3),     # GQA 16 (16 rows: no padding rows)
]


@pytest.mark.parametrize("heads,kv_heads,dim,capacity,approximate_lse,packed,topk,num_splits",
                         DECODE_CASES)
def test_decode_and_kernel_equal_infllmv2_attention(heads, kv_heads, dim, capacity,
                                                    approximate_lse, packed, topk, num_splits):
  cfg = dataclasses.replace(CFG, approximate_lse=approximate_lse, topk=topk)
  q, k, v, q_start, seg, kv_seg = _decode_inputs(heads, kv_heads, dim, capacity, packed)
  kc, kc_coarse = _cached_keys(k, q_start, cfg)
  kc_coarse = kc_coarse if approximate_lse else None
  mask = dict(segment_ids=seg, kv_segment_ids=kv_seg, q_start=q_start, kv_lengths=q_start + 1)
  want = infllmv2_attention(q, k, v, cfg, **mask)
  got = infllmv2_decode(q, k, v, kc, cfg, q_start=q_start, kc_coarse=kc_coarse,
                        segment_ids=seg, kv_segment_ids=kv_seg)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # (Row 0 really drops blocks and row 1 really falls back to dense: see
  # test_decode_blocks_fold_in_the_dense_fallback, on the same inputs.)
  args = (q, k, v, kc, q_start, seg, kv_seg, kc_coarse)
  for keys_kernel in (False, True):
    out, lse = kernel_decode(*args, cfg=cfg, implementation="interpret", num_splits=num_splits,
                             keys_kernel=keys_kernel)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
    np.testing.assert_allclose(out, want[:, 0], rtol=2e-5, atol=2e-5)
  # The layer's step: the scores kernel selects and attends the forced blocks (1, 2 or 3
  # programs a row; 3 > the 2 forced blocks: an idle program), sparse_decode the rest.
  for forced_splits in (None, 1, 3, 0):
    got = decode_step_kernels(q, k, v, kc, cfg, q_start=q_start, kc_coarse=kc_coarse,
                              segment_ids=seg, kv_segment_ids=kv_seg,
                              implementation="interpret", forced_splits=forced_splits,
                              num_splits=num_splits)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("num_splits", [3, 11])
def test_kernel_with_dead_slots_anywhere(num_splits):
  """Slots need not be valid-first; a (row, KV head) with no live slot gets zeros, lse -inf;
  against the kernel's own gather reference (out and lse). 11 splits: more than the slots
  (empty splits)."""
  q, k, v, q_start, _, _ = _decode_inputs(4, 2, 16, 75, False, seed=1)
  idx = jnp.array([[[0, 4, 2, 3], [1, 2, 3, 4]], [[0, 1, -1, 3], [2, 0, 1, 3]]], jnp.int32)
  valid = jnp.array([[[1, 0, 1, 1], [0, 0, 0, 0]], [[1, 0, 1, 1], [1, 1, 0, 1]]], bool)
  args = (q[:, 0], k, v, idx, valid, q_start + 1)
  got, got_lse = sparse_decode(*args, block_size=16, implementation="interpret",
                               num_splits=num_splits, poison_outputs=True)
  ref, ref_lse = sparse_decode(*args, block_size=16, implementation="reference")
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_lse, ref_lse, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(got[0, 2:], 0.0)  # heads 2, 3 read KV head 1: no live slot
  assert np.isneginf(np.asarray(got_lse[0, 2:])).all()
  # Without block_valid, a negative index alone marks a dead slot: the same results.
  no_valid = sparse_decode(q[:, 0], k, v, jnp.where(valid, idx, -1), None, q_start + 1,
                           block_size=16, implementation="interpret", num_splits=num_splits)
  np.testing.assert_array_equal(no_valid[0], got)
  np.testing.assert_array_equal(no_valid[1], got_lse)


def test_kernel_on_a_cache_shorter_than_a_block():
  """capacity 10 < block 16: the op pads the cache to one block; GQA 1."""
  cfg = dataclasses.replace(CFG, topk=2, dense_len=0)
  q, k, v, q_start, _, _ = _decode_inputs(2, 2, 16, 10, False)
  kc, _ = _cached_keys(k, q_start, cfg)
  want = infllmv2_decode(q, k, v, kc, cfg, q_start=q_start)
  got, _ = kernel_decode(q, k, v, kc, q_start, None, None, None, cfg=cfg,
                         implementation="interpret", num_splits=3)
  np.testing.assert_allclose(got, want[:, 0], rtol=2e-5, atol=2e-5)


def test_decode_blocks_fold_in_the_dense_fallback():
  q, k, v, q_start, _, _ = _decode_inputs(4, 2, 16, 75, False)
  kc = compress_keys(k, window=8, stride=4)
  idx, valid = select_decode_blocks(q, kc, CFG, kv_len=75, q_start=q_start)
  assert idx.shape == (2, 1, 2, infllmv2.decode_width(CFG, 75)) == (2, 1, 2, 3)
  assert valid[0].sum(-1).tolist() == [[3, 3]]           # row 0: topk = 3 of its 5 blocks
  np.testing.assert_array_equal(idx[1, 0], [[0, 1, -1], [0, 1, -1]])  # keys 0..25: blocks 0, 1
  wide = dataclasses.replace(CFG, dense_len=70)  # a row below 70 may need 5 blocks > topk
  assert infllmv2.decode_width(wide, 75) == 5
  whole = dataclasses.replace(CFG, dense_len=100)  # the whole cache below dense_len: dense
  got = infllmv2_decode(q, k, v, kc, whole, q_start=q_start)
  want = infllmv2.dense_attention(q, k, v, implementation="xla", q_start=q_start,
                                  kv_lengths=q_start + 1)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Generation through the model


SPARSE = dict(block_size=16, compress_window=8, compress_stride=4, lse_window=16, lse_stride=8,
              init_blocks=1, local_blocks=1, topk=2, dense_len=40)


def sparse_model_config(**options):
  return small_config(num_layers=1, attention="infllmv2",
                      attention_options=tuple(sorted((SPARSE | options).items())))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _greedy_with_plain_cache(graphdef, state, tokens, segment_ids, lengths, *, steps):
  """generate()'s greedy algorithm on a cache WITHOUT compressed keys (KVCache.init), i.e. the
  reference decode path: `infllmv2_attention`, recompressing the whole cache every step."""
  model = nnx.merge(graphdef, state)
  cfg = model.config
  batch, width = tokens.shape
  cache = KVCache.init(num_layers=cfg.num_layers, batch=batch, capacity=width + steps,
                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       dtype=cfg.compute_dtype)
  logits, _, cache = model(tokens, segment_ids=segment_ids, cache=cache)
  cache = cache.replace(lengths=lengths)
  first = jnp.argmax(logits[jnp.arange(batch), lengths - 1], -1)
  out = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(first)

  def body(i, carry):
    cache, out = carry
    prev = out[:, i - 1][:, None]
    logits, _, cache = model(prev, positions=cache.lengths[:, None],
                             segment_ids=jnp.ones_like(prev), cache=cache)
    return cache, out.at[:, i].set(jnp.argmax(logits[:, 0], -1))

  return jax.lax.fori_loop(1, steps, body, (cache, out))[1]


def numpy_model(config, seed):
  """A DecoderLM of `config` with random parameters drawn by numpy (the model's own jax.random
  initialisers compile once per parameter shape: seconds on a CPU)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract, nnx.Param)
  rng = np.random.default_rng(seed)
  draw = lambda x: jnp.asarray(
      1.0 + 0.1 * rng.standard_normal(x.shape) if len(x.shape) == 1  # norm scales
      else rng.standard_normal(x.shape) / np.sqrt(x.shape[0]), x.dtype)
  return nnx.merge(graphdef, jax.tree.map(draw, nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))


def test_generation_with_cached_compressed_keys_equals_reference_path():
  cfg = sparse_model_config(kernel="reference")
  assert KVCache.for_model(cfg, batch=1, capacity=64).layers[0].kc.shape == (1, 15, 2, 16)
  assert KVCache.for_model(small_config(), batch=1, capacity=64).layers[0].kc is None
  model = numpy_model(cfg, 3)
  # Ragged prompts: row 1 starts below dense_len=40 and crosses it while decoding.
  prompts = [list(range(3, 48)), list(range(60, 90)), [5, 6, 7]]
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((3, lengths.max()), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  seg = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
  want = _greedy_with_plain_cache(*nnx.split(model), tokens, seg, lengths, steps=14).tolist()
  assert generate(model, prompts, max_new_tokens=14) == want  # jnp decode from the cache
  xla_keys = with_params_of(model, sparse_model_config(kernel="interpret",
                                                       decode_keys_kernel=False))
  assert generate(xla_keys, prompts, max_new_tokens=14) == want  # the Pallas kernel, XLA's keys
  keys = with_params_of(model, sparse_model_config(kernel="interpret", topk_kernel=False))
  assert generate(keys, prompts, max_new_tokens=14) == want  # + the selection-key kernels
  kernel = with_params_of(model, sparse_model_config(kernel="interpret"))
  assert generate(kernel, prompts, max_new_tokens=14) == want  # + the top-k in the scores kernel


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_value_errors():
  q, k, v, q_start, seg, kv_seg = _decode_inputs(4, 2, 16, 75, True)
  kc = compress_keys(k, window=8, stride=4)
  with pytest.raises(ValueError, match="kc must be"):
    infllmv2.infllmv2_decode(q, k, v, kc[:, :-1], CFG, q_start=q_start)
  with pytest.raises(ValueError, match="needs kc_coarse"):
    infllmv2.infllmv2_decode(q, k, v, kc, dataclasses.replace(CFG, approximate_lse=True),
                             q_start=q_start)
  with pytest.raises(ValueError, match="one token per row"):
    infllmv2.infllmv2_decode(jnp.concatenate([q, q], 1), k, v, kc, CFG, q_start=q_start)
  with pytest.raises(ValueError, match="q_start"):
    infllmv2.infllmv2_decode(q, k, v, kc, CFG, q_start=None)
  with pytest.raises(ValueError, match="count must be a positive int"):
    infllmv2.update_compressed_keys(kc, k, q_start, 0, window=8, stride=4)
  with pytest.raises(ValueError, match="kc must have shape"):
    infllmv2.update_compressed_keys(kc, k, q_start, 1, window=8, stride=2)
  with pytest.raises(ValueError, match="offsets must be an int"):
    infllmv2.update_compressed_keys(kc, k, q_start[:1], 1, window=8, stride=4)
  with pytest.raises(ValueError, match="compressed must hold"):
    KVCache.init(num_layers=1, batch=1, capacity=8, num_kv_heads=1, head_dim=4,
                 compressed=((8, 0),))
  idx, valid = jnp.zeros((2, 2, 3), jnp.int32), jnp.ones((2, 2, 3), bool)
  args = (q[:, 0], k, v, idx, valid, q_start + 1)
  with pytest.raises(ValueError, match="implementation must be one of"):
    sparse_decode(*args, block_size=16, implementation="triton")
  with pytest.raises(ValueError, match="block_size must be a power of two"):
    sparse_decode(*args, block_size=24)
  with pytest.raises(ValueError, match="head_dim must be a power of two"):
    sparse_decode(q[:, 0, :, :12], k[..., :12], v[..., :12], idx, valid, q_start + 1)
  with pytest.raises(ValueError, match=r"block_idx and block_valid must be \[batch, kv_heads"):
    sparse_decode(q[:, 0], k, v, idx[:, :1], valid[:, :1], q_start + 1)
  with pytest.raises(ValueError, match="lengths must be an int"):
    sparse_decode(*args[:5], q_start[:1])
  with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
    sparse_decode(*args, q_segment_ids=seg[:, 0])
  with pytest.raises(ValueError, match="num_splits must be None or a positive int"):
    sparse_decode(*args, num_splits=0)


def test_benchmark_quick_mode(tmp_path):
  """The benchmark binary in --quick mode (interpret, tiny), in a subprocess: importing it here
  would define its absl flags in this test process, next to the other binaries' flags."""
  import json

  from tests.test_experiments import run
  out = str(tmp_path / "bench_decode")
  run("experiments.bench_decode", "--quick", "--seq_lens=128", "--batch=2", "--configs=issue",
      "--iters=1", "--profile", "--keys_kernel", "--approximate_lse", f"--out={out}")
  with open(out + ".json") as f:
    rows = json.load(f)["rows"]
  assert [r["config"] for r in rows] == ["issue"]
  for key in ("seq_len", "batch", "pass", "sparsejax_ms", "cudnn_dense_ms", "floor_ms",
              "speedup_vs_cudnn_dense", "selection_ms", "attention_ms"):
    assert key in rows[0]
  # The in-step timing ran: finite times over 4 distinct caches.
  assert rows[0]["step_layers"] == 4
  assert rows[0]["step_sparsejax_ms"] > 0 and rows[0]["step_cudnn_dense_ms"] > 0
  assert rows[0]["pass"] == "decode" and rows[0]["max_abs_err_vs_reference"] < 1e-4
  assert rows[0]["step_max_abs_err_vs_reference"] < 1e-4
  assert rows[0]["keys_kernel"] and rows[0]["selections_equal_to_xla_keys"] == 1.0
  assert rows[0]["approximate_lse"]
  # The step timed is the layer's: init 1 + local 2 forced blocks, one program each at batch 2.
  assert rows[0]["forced_splits"] == 3
  # --profile: both in-step programs traced (on the CPU, the host's events stand in for kernels).
  for kind in ("sparse", "dense"):
    summary = rows[0]["profile"][kind]["summary"]
    assert summary["wall_us"] > 0 and summary["kernels_per_call"] > 0
  with open(out + "_profile.md") as f:
    assert "sparse" in f.read()
  kernel_us = rows[0]["step_kernel_us"]
  assert kernel_us["sparse"] > 0 and rows[0]["step_kernel_speedup_vs_cudnn_dense"] == (
      kernel_us["dense"] / kernel_us["sparse"])
  with open(out + ".md") as f:
    assert "Kernel time per step, profiled" in f.read()


def test_decode_sweep_smoke(tmp_path):
  """experiments/decode_sweep.py in interpret mode: every variant runs the same step (equal
  outputs up to the split combine's rounding) and lands in the JSON and the table; a knob it
  does not know is an error that names the flag."""
  import json
  import os
  import subprocess
  import sys

  from tests.test_experiments import ROOT, run
  out = str(tmp_path / "sweep")
  run("experiments.decode_sweep", "--implementation=interpret", "--seq_len=1024", "--batch=2",
      "--layers=1", "--step_reps=1", "--iters=2",
      "--variants=base;splits=3,fused=0,topk_warps=8;mosaic=1,stages=2,touch=64",
      f"--out={out}")
  with open(out + ".json") as f:
    rows = json.load(f)["rows"]
  # The second variant selects with the separate top-k kernel: the same blocks; the third
  # attends them with sparse_decode's Mosaic GPU kernel (segment ids included), after reading
  # one element per 64 KB of the caches (the TLB experiment): the same output.
  assert [r["variant"] for r in rows] == ["base", "splits=3,fused=0,topk_warps=8",
                                          "mosaic=1,stages=2,touch=64"]
  assert rows[1]["knobs"] == {"splits": 3, "fused_select": 0, "topk_num_warps": 8}
  assert rows[2]["knobs"]["mosaic"] == 1 and rows[2]["knobs"]["touch_kb"] == 64
  assert max(r["max_abs_diff_vs_first"] for r in rows[1:]) < 1e-2 and rows[0]["in_step_us"] > 0
  for r in rows:  # the interleaved rounds' spread brackets the median
    low, high = r["in_step_us_quartiles"]
    assert 0 < low <= r["in_step_us"] <= high and r["in_step_us_one_program_a_sample"] > 0
  with open(out + ".md") as f:
    assert f.read().count("\n| ") == 4  # header row + 3 variants
  bad = subprocess.run([sys.executable, "-m", "experiments.decode_sweep", "--variants=blocks=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert bad.returncode != 0 and "--variants: 'blocks=2'" in bad.stderr
