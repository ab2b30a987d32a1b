"""One-off probe of the Mosaic GPU forward (forward_mosaic.py) on the GPU: correctness against
the Triton forward and the reference, then times against the Triton forward and cuDNN, given the
index. Prints JSON lines."""
import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments import timing
from experiments.bench_attention import structured_inputs, synthetic_selection
from pallas_kernels.block_scores import score_and_select
from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.sparse_attention.forward import sparse_attention_forward
from pallas_kernels.sparse_attention.forward_mosaic import (sparse_attention_forward_mosaic,
                                                            tile_tokens)
from pallas_kernels.sparse_attention.index import (next_power_of_2, query_block_unions,
                                                   union_token_bits)
from pallas_kernels.sparse_attention.reference import sparse_attention_reference
from sparsejax.ops.infllmv2 import InfLLMv2Config

HEADS, KV, DIM = 32, 2, 128
say = lambda **kw: print(json.dumps(kw), flush=True)


def mosaic(q, k, v, idx, valid, hp, stages=4):
  unions, bits = union_token_bits(idx, valid, num_kv_blocks=k.shape[1] // 64,
                                  tile_tokens=tile_tokens(hp))
  return sparse_attention_forward_mosaic(q, k, v, unions, bits, block_k=64,
                                         heads_per_program=hp, stages=stages)


def check(seq=4096, topk=16):
  rng = np.random.default_rng(0)
  key = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(key[0], (1, seq, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(key[1], (1, seq, KV, DIM), jnp.bfloat16)
  v = jax.random.normal(key[2], (1, seq, KV, DIM), jnp.bfloat16)
  tok = np.arange(seq)
  idx = rng.integers(0, seq // 64, size=(1, seq, KV, topk))
  idx[..., 0] = (tok // 64)[None, :, None]
  idx[..., 1] = 0
  idx = np.minimum(idx, (tok // 64)[None, :, None, None]).astype(np.int32)
  valid = rng.random(idx.shape) > 0.1
  valid[..., 0] = True
  idx, valid = jnp.asarray(idx), jnp.asarray(valid)
  ro, rl = sparse_attention_reference(q, k, v, idx, valid, jnp.ones((1, seq), jnp.int32),
                                      block_size=64)
  for hp in (16, 8, 1):
    try:
      out, lse = jax.jit(mosaic, static_argnums=(5,))(q, k, v, idx, valid, hp)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ro.astype(jnp.float32))))
      lerr = float(jnp.max(jnp.abs(jnp.transpose(lse, (0, 2, 1)) - rl)))
      say(check="mosaic_vs_reference", hp=hp, seq=seq, out_err=err, lse_err=lerr,
          nan=bool(jnp.isnan(out.astype(jnp.float32)).any()))
    except Exception as e:
      traceback.print_exc()
      say(check="mosaic", hp=hp, error=f"{type(e).__name__}: {e}"[:2000])


def times(seq):
  rng = np.random.default_rng(0)
  keys = jax.random.split(jax.random.key(seq), 3)
  q = jax.random.normal(keys[0], (1, seq, HEADS, DIM), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, KV, DIM), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, seq, KV, DIM), jnp.bfloat16)
  window = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(4095, 0), implementation="cudnn"))
  t_window = timing.timeit(window, q, k, v, iters=5)
  flops = 4 * HEADS * DIM * sum(min(t + 1, 4096) for t in range(0, seq, 64)) * 64
  sel = synthetic_selection(seq, rng)                      # shared by each 64-token block
  idx = sel
  valid = idx >= 0
  seg = jnp.ones((1, seq), jnp.int32)
  unions = jax.jit(lambda i: query_block_unions(i, i >= 0, num_kv_blocks=seq // 64,
                                                block_q=64))(idx)
  triton = jax.jit(lambda q, k, v, i, u: sparse_attention_forward(
      q, k, v, i, seg, seg, u, block_q=64, block_k=64, num_warps=4, num_stages=3)[0])
  t_triton = timing.timeit(triton, q, k, v, idx, unions, iters=5)
  say(pass_="attn_only", seq=seq, window_ms=t_window, triton_ms=t_triton,
      triton_vs_floor=t_triton / t_window, window_tflops=flops / t_window / 1e9)
  for hp, stages in ((1, 4), (1, 3), (16, 4), (8, 4)):
    try:
      u, b = jax.jit(lambda i, hp=hp: union_token_bits(i, i >= 0, num_kv_blocks=seq // 64,
                                                         tile_tokens=tile_tokens(hp)))(idx)
      f = jax.jit(lambda q, k, v, u, b, hp=hp, st=stages: sparse_attention_forward_mosaic(
          q, k, v, u, b, block_k=64, heads_per_program=hp, stages=st)[0])
      t = timing.timeit(f, q, k, v, u, b, iters=5)
      diff = float(jnp.max(jnp.abs(f(q, k, v, u, b).astype(jnp.float32)
                                   - triton(q, k, v, idx, unions).astype(jnp.float32))))
      say(pass_="attn_only", seq=seq, hp=hp, stages=stages, mosaic_ms=t,
          mosaic_vs_floor=t / t_window, mosaic_vs_triton=t / t_triton,
          mean_union=float(jnp.mean(u[..., 0].astype(jnp.float32))), max_diff_vs_triton=diff)
    except Exception as e:
      say(pass_="attn_only", seq=seq, hp=hp, error=f"{type(e).__name__}: {e}"[:1500])
  # The forward's own selection (scores + top-k on structured inputs), given the selection.
  q, k, v = structured_inputs(seq, keys[0])
  cfg = InfLLMv2Config(block_size=64, init_blocks=1, local_blocks=32, topk=64, dense_len=0)
  idx, valid = jax.jit(lambda q, k: score_and_select(q, k, cfg))(q, k)
  given = jax.jit(lambda q, k, v, i, m: sparse_attention(
      q, k, v, i, m, block_size=64, block_q=4, heads_per_program=16)[0])
  t_given = timing.timeit(given, q, k, v, idx, valid, iters=5)
  for hp in (16, 8):
    try:
      f = jax.jit(lambda q, k, v, i, m, hp=hp: mosaic(q, k, v, i, m, hp)[0])
      t = timing.timeit(f, q, k, v, idx, valid, iters=5)
      u = jax.jit(lambda i, m, hp=hp: union_token_bits(
          i, m, num_kv_blocks=seq // 64, tile_tokens=tile_tokens(hp))[0])(idx, valid)
      ti = timing.timeit(jax.jit(lambda i, m, hp=hp: union_token_bits(
          i, m, num_kv_blocks=seq // 64, tile_tokens=tile_tokens(hp))), idx, valid, iters=5)
      diff = float(jnp.max(jnp.abs(f(q, k, v, idx, valid).astype(jnp.float32)
                                   - given(q, k, v, idx, valid).astype(jnp.float32))))
      say(pass_="fwd_given_selection", seq=seq, hp=hp, triton_op_ms=t_given, mosaic_op_ms=t,
          index_ms=ti, mean_cta_union=float(jnp.mean(u[..., 0].astype(jnp.float32))),
          max_diff_vs_triton=diff)
    except Exception as e:
      say(pass_="fwd_given_selection", seq=seq, hp=hp, error=f"{type(e).__name__}: {e}"[:1500])


if __name__ == "__main__":
  from absl import flags
  flags.FLAGS(sys.argv[:1])   # bench_attention's helpers read its flags' defaults
  say(device=str(jax.devices()[0]), jax=jax.__version__)
  check()
  for seq in map(int, sys.argv[1:] or ["32768", "131072"]):
    times(seq)
