"""The block-sparse attention kernel on the GPU (Triton lowering), bf16, against the jnp
reference, with InfLLM-V2's own selection at realistic block sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import Launch, sparse_attention, sparse_attention_reference
from sparsejax.ops import infllmv2 as ref_ops


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def problem(seed, seq, heads, kv_heads, packed):
  """bf16 q, k, v, a float32 cotangent w, the segment ids (None or two documents) and
  InfLLM-V2's own selection (init 1, local 8, top-16 blocks of 64)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (1, seq, heads, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, kv_heads, 128), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, seq, kv_heads, 128), jnp.bfloat16)
  w = jax.random.normal(keys[3], q.shape, jnp.float32)
  seg = None
  if packed:
    seg = jnp.asarray(np.r_[np.ones(seq // 3), 2 * np.ones(seq - seq // 3)][None], jnp.int32)
  cfg = ref_ops.InfLLMv2Config(init_blocks=1, local_blocks=8, topk=16, dense_len=0)
  scores = jax.jit(lambda q, k: ref_ops.block_scores(q, k, cfg, segment_ids=seg))(q, k)
  idx, valid = ref_ops.select_blocks(scores, cfg, q_len=seq, kv_len=seq, segment_ids=seg)
  return q, k, v, w, seg, idx, valid


@pytest.mark.parametrize("seq,heads,kv_heads,packed,hp", [
    (4096, 32, 2, False, 1), (4000, 8, 8, True, 1), (2048, 16, 1, True, 1),
    (4096, 32, 2, False, 16), (4000, 16, 2, True, 8)])
def test_pallas_matches_reference(seq, heads, kv_heads, packed, hp):
  q, k, v, _, seg, idx, valid = problem(seq, seq, heads, kv_heads, packed)
  segments = jnp.ones((1, seq), jnp.int32) if seg is None else seg
  got, got_lse = jax.jit(lambda *a: sparse_attention(*a, segment_ids=seg, heads_per_program=hp,
                                                      poison_outputs=True))(q, k, v, idx, valid)
  want, want_lse = jax.jit(lambda *a: sparse_attention_reference(*a, segments, block_size=64))(
      q, k, v, idx, valid)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  assert rel_err(got, want) < 1e-2
  assert rel_err(got_lse, want_lse) < 1e-3


@pytest.mark.parametrize("seq,heads,kv_heads,packed,hp,chunk,dq_atomic,dkdv", [
    (4096, 32, 2, False, 1, 1024, False, "triton"), (3000, 8, 8, False, 1, 1024, False, "triton"),
    # The backward on the forward's (token, head) tiles: hp = group, and hp < group (dk/dv loop
    # over two head-chunks), ragged and packed; 64 tiles per dk/dv item: the init block's
    # 1024 tiles come in 16 items, summed afterwards.
    (4096, 32, 2, False, 16, 64, False, "triton"), (4000, 32, 2, True, 8, 1024, False, "triton"),
    (4000, 32, 2, True, 8, 64, False, "triton"),
    # dQ added by the dk/dv kernel with atomics (Launch.dq_atomic).
    (4096, 32, 2, False, 16, 64, True, "triton"), (4000, 32, 2, True, 8, 1024, True, "triton"),
    # The Hopper dK/dV kernel (backward_mosaic.py, the default there where it applies): GQA 16
    # tiles, two head chunks per tile with items of 64 tiles (ragged), 32-token tiles of 2 heads
    # with four chunks.
    (4096, 32, 2, False, 16, 1024, False, "mosaic"), (4000, 32, 2, False, 8, 64, False, "mosaic"),
    (3000, 8, 1, False, 2, 64, False, "mosaic")])
def test_pallas_gradients_match_reference(seq, heads, kv_heads, packed, hp, chunk, dq_atomic,
                                          dkdv):
  q, k, v, w, seg, idx, valid = problem(seq + 1, seq, heads, kv_heads, packed)
  segments = jnp.ones((1, seq), jnp.int32) if seg is None else seg

  def loss(impl, q, k, v):
    if impl == "pallas":
      out, _ = sparse_attention(q, k, v, idx, valid, segment_ids=seg, heads_per_program=hp,
                                launch=Launch(dkdv_chunk=chunk, dq_atomic=dq_atomic,
                                              dkdv_kernel=dkdv))
    else:
      out, _ = sparse_attention_reference(q, k, v, idx, valid, segments, block_size=64)
    return jnp.sum(out.astype(jnp.float32) * w)

  got = jax.jit(jax.grad(lambda *a: loss("pallas", *a), (0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(lambda *a: loss("reference", *a), (0, 1, 2)))(q, k, v)
  for g, r in zip(got, want):
    assert np.isfinite(np.asarray(g, np.float32)).all()
    assert rel_err(g, r) < 2e-2


@pytest.mark.parametrize("seq,heads,kv_heads,hp,stages,packed", [
    (4096, 32, 2, 16, 4, False), (4000, 32, 2, 8, 3, True), (4096, 8, 2, 1, 4, False),
    (2000, 4, 4, 1, 2, True)])
def test_mosaic_forward_matches_reference(seq, heads, kv_heads, hp, stages, packed):
  """The Hopper forward (Launch.forward_kernel='mosaic'), ragged lengths and packed documents
  included, and its gradient through the Triton backward kernels."""
  q, k, v, w, seg, idx, valid = problem(seq + 2, seq, heads, kv_heads, packed)
  launch = Launch(forward_kernel="mosaic", mosaic_stages=stages)
  mosaic = lambda *a: sparse_attention(*a, segment_ids=seg, heads_per_program=hp, launch=launch)
  got, got_lse = jax.jit(mosaic)(q, k, v, idx, valid)
  segments = jnp.ones((1, seq), jnp.int32) if seg is None else seg
  want, want_lse = jax.jit(lambda *a: sparse_attention_reference(*a, segments, block_size=64))(
      q, k, v, idx, valid)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  assert rel_err(got, want) < 1e-2
  assert rel_err(got_lse, want_lse) < 1e-3
  loss = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      f(q, k, v, idx, valid)[0].astype(jnp.float32) * w), (0, 1, 2)))
  triton = lambda *a: sparse_attention(*a, segment_ids=seg, heads_per_program=hp)
  for got, want in zip(loss(mosaic)(q, k, v), loss(triton)(q, k, v)):
    assert rel_err(got, want) < 1e-2



def test_key_bias_matches_reference():
  """A per-key logit bias (NOSA's eviction scores, key_bias ~ N(0, 2)) at 8k tokens, 32 heads
  over 2 KV heads: forward and the gradients of q, k, v and key_bias against the float32
  reference, through the Triton kernels (which "auto" must pick on Hopper too: the Mosaic ones
  take no bias), one head per program and 16 with split dk/dv work items."""
  seq, heads, kv_heads, topk = 8192, 32, 2, 32
  keys = jax.random.split(jax.random.key(8), 6)
  q = jax.random.normal(keys[0], (1, seq, heads, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, kv_heads, 128), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, seq, kv_heads, 128), jnp.bfloat16)
  bias = 2.0 * jax.random.normal(keys[3], (1, seq, kv_heads), jnp.float32)
  w = jax.random.normal(keys[4], q.shape, jnp.float32)
  own = jnp.arange(seq) // 64
  idx = (jax.random.uniform(keys[5], (1, seq, kv_heads, topk))
         * (own[None, :, None, None] + 1)).astype(jnp.int32)      # random blocks up to its own
  idx = idx.at[..., 0].set(own[None, :, None])
  valid = jnp.ones(idx.shape, bool)
  segments = jnp.ones((1, seq), jnp.int32)

  def loss(run, q, k, v, bias):
    out, lse = run(q, k, v, bias)
    return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse)

  reference = lambda q, k, v, bias: sparse_attention_reference(
      q, k, v, idx, valid, segments, block_size=64, key_bias=bias)
  want, want_lse = jax.jit(reference)(q, k, v, bias)
  want_grads = jax.jit(jax.grad(lambda *a: loss(reference, *a), (0, 1, 2, 3)))(q, k, v, bias)
  for hp, chunk in ((1, 1024), (16, 64)):
    kernel = lambda q, k, v, bias: sparse_attention(
        q, k, v, idx, valid, key_bias=bias, heads_per_program=hp,
        launch=Launch(dkdv_chunk=chunk))
    got, got_lse = jax.jit(kernel)(q, k, v, bias)
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert rel_err(got, want) < 1e-2
    assert rel_err(got_lse, want_lse) < 1e-3
    grads = jax.jit(jax.grad(lambda *a: loss(kernel, *a), (0, 1, 2, 3)))(q, k, v, bias)
    for name, g, r in zip(("dq", "dk", "dv", "d_key_bias"), grads, want_grads):
      assert np.isfinite(np.asarray(g, np.float32)).all(), (hp, name)
      assert rel_err(g, r) < 2e-2, (hp, name, rel_err(g, r))
