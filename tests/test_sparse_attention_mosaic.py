"""The Mosaic GPU forward (forward_mosaic.py) in Mosaic GPU interpret mode on the CPU, against the
reference, through the op (ragged lengths padded by it); and its index, `union_token_bits`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import Launch, query_block_unions, sparse_attention
from pallas_kernels.sparse_attention.index import union_token_bits

MOSAIC = Launch(forward_kernel="mosaic", mosaic_stages=2)


@pytest.mark.parametrize("tile_tokens", [4, 8, 64, 128])
def test_union_token_bits_match_sets(tile_tokens):
  """Random selections with repeats, dead slots and out-of-range ids: the unions are
  query_block_unions', and bit i of a slot's words is set exactly when token i selected it."""
  rng = np.random.default_rng(tile_tokens)
  idx = rng.integers(-2, 41, (2, 2 * tile_tokens, 2, 5))          # 40 key blocks: 40 is out
  valid = rng.random(idx.shape) < 0.8
  unions, bits = union_token_bits(jnp.asarray(idx, jnp.int32), jnp.asarray(valid),
                                  num_kv_blocks=40, tile_tokens=tile_tokens)
  np.testing.assert_array_equal(unions, query_block_unions(
      jnp.asarray(idx, jnp.int32), jnp.asarray(valid), num_kv_blocks=40, block_q=tile_tokens))
  unions, bits = np.asarray(unions), np.asarray(bits).view(np.uint32)
  assert bits.shape == (*unions.shape[:3], -(-tile_tokens // 32), unions.shape[-1])
  live = valid & (idx >= 0) & (idx < 40)
  for b, h, tile in np.ndindex(*unions.shape[:3]):
    count = unions[b, h, tile, 0]
    for slot, block in enumerate(unions[b, h, tile, 1:1 + count]):
      for token in range(tile_tokens):
        t = tile * tile_tokens + token
        want = bool(np.any((idx[b, t, h] == block) & live[b, t, h]))
        assert (bits[b, h, tile, token // 32, 1 + slot] >> (token % 32)) & 1 == want
    assert not bits[b, h, tile, :, 1 + count:].any() and not bits[b, h, tile, :, 0].any()


def _inputs(seed, seq, heads, kv_heads, dim, topk, block):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (1, seq, heads, dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, kv_heads, dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, seq, kv_heads, dim), jnp.bfloat16)
  rng = np.random.default_rng(seed)
  own = np.arange(seq) // block
  idx = rng.integers(0, -(-seq // block), (1, seq, kv_heads, topk))
  idx[..., 0] = own[None, :, None]
  idx = np.minimum(idx, own[None, :, None, None])
  valid = rng.random(idx.shape) < 0.85
  return q, k, v, jnp.asarray(idx, jnp.int32), jnp.asarray(valid)


@pytest.mark.parametrize("seq,heads,kv_heads,hp,packed", [
    (200, 16, 2, 8, True),     # ragged: 200 tokens padded to CTAs of 16; three documents
    (72, 32, 2, 16, False),    # GQA 16, two head groups, CTAs of 8 tokens
    (256, 2, 1, 1, True),      # one head per CTA: 64-token tiles, two words of bits each
])
def test_mosaic_forward_matches_reference(seq, heads, kv_heads, hp, packed):
  block = 64
  q, k, v, idx, valid = _inputs(seq, seq, heads, kv_heads, 64, 3, block)
  # Documents as packing makes them (runs of ids), one starting inside a tile, mid-block.
  seg = jnp.asarray(np.searchsorted([seq // 3 + 5, seq - 30], np.arange(seq), side="right")[None]
                    + 1, jnp.int32) if packed else None
  got, got_lse = sparse_attention(q, k, v, idx, valid, block_size=block, heads_per_program=hp,
                                  segment_ids=seg, implementation="interpret", launch=MOSAIC)
  want, want_lse = sparse_attention(q, k, v, idx, valid, block_size=block, segment_ids=seg,
                                    implementation="reference")
  np.testing.assert_array_equal(np.isfinite(got_lse), np.isfinite(want_lse))
  np.testing.assert_allclose(np.where(np.isfinite(got_lse), got_lse, 0),
                             np.where(np.isfinite(want_lse), want_lse, 0), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.parametrize("seq,heads,kv_heads,hp,packed", [
    (200, 16, 2, 8, True),     # ragged, packed
    (256, 2, 1, 1, False),     # one head per CTA
])
def test_mosaic_forward_with_key_bias_matches_reference(seq, heads, kv_heads, hp, packed):
  """NOSA's per-key bias in the Mosaic forward: out and lse against the reference, which the bias
  really changes."""
  block = 64
  q, k, v, idx, valid = _inputs(seq + 1, seq, heads, kv_heads, 64, 3, block)
  bias = 2.0 * jax.random.normal(jax.random.key(seq), (1, seq, kv_heads))
  seg = jnp.asarray(np.searchsorted([seq // 3 + 5], np.arange(seq), side="right")[None] + 1,
                    jnp.int32) if packed else None
  run = lambda impl, launch=Launch(): sparse_attention(
      q, k, v, idx, valid, block_size=block, heads_per_program=hp, segment_ids=seg,
      key_bias=bias, implementation=impl, launch=launch)
  got, got_lse = run("interpret", Launch(forward_kernel="mosaic", dkdv_kernel="triton",
                                         mosaic_stages=2))
  want, want_lse = run("reference")
  np.testing.assert_array_equal(np.isfinite(got_lse), np.isfinite(want_lse))
  np.testing.assert_allclose(np.where(np.isfinite(got_lse), got_lse, 0),
                             np.where(np.isfinite(want_lse), want_lse, 0), atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=1.6e-2, rtol=1.6e-2)
  plain = sparse_attention(q, k, v, idx, valid, block_size=block, segment_ids=seg,
                           implementation="reference")[0]
  assert not np.allclose(np.asarray(plain, np.float32), np.asarray(want, np.float32), atol=0.05)


def test_mosaic_forward_bad_inputs_are_named():
  q, k, v, idx, valid = _inputs(0, 128, 4, 2, 64, 2, 64)
  with pytest.raises(ValueError, match="heads_per_program must be one of"):
    sparse_attention(q, k, v, idx, valid, heads_per_program=2, launch=MOSAIC)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    sparse_attention(q.astype(jnp.float32), k, v, idx, valid, launch=MOSAIC)
  with pytest.raises(ValueError, match="forward_kernel must be one of"):
    sparse_attention(q, k, v, idx, valid, launch=Launch(forward_kernel="cuda"))
  with pytest.raises(ValueError, match="mosaic_stages must be an int >= 2"):
    sparse_attention(q, k, v, idx, valid, launch=Launch(forward_kernel="mosaic", mosaic_stages=1))


def test_segment_ids_that_come_back_give_nan():
  """Documents are runs of equal ids in the Mosaic forward; ids 1, 2, 1 (where the reference
  lets the two runs of 1 see each other) must not pass silently."""
  q, k, v, idx, valid = _inputs(1, 128, 8, 1, 64, 2, 64)
  seg = jnp.asarray(np.r_[np.ones(40), 2 * np.ones(40), np.ones(48)][None], jnp.int32)
  out, lse = sparse_attention(q, k, v, idx, valid, segment_ids=seg, heads_per_program=8,
                              implementation="interpret", launch=MOSAIC)
  assert np.isnan(np.asarray(out, np.float32)).all() and np.isnan(np.asarray(lse)).all()


@pytest.mark.parametrize("hp", [1, 8, 16])
def test_mosaic_forward_lowers_for_the_gpu(hp):
  """The kernel lowers to Mosaic GPU for CUDA here, without a GPU: the Pallas lowering rules
  (layouts, transforms, barriers) that interpret mode does not exercise; compiling the module to
  a cubin still needs a GPU (tests/gpu)."""
  from pallas_kernels.sparse_attention.forward_mosaic import (sparse_attention_forward_mosaic,
                                                              tile_tokens)
  tokens = tile_tokens(hp)
  spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
  q, kv = spec((1, 1024, 32, 128), jnp.bfloat16), spec((1, 1024, 2, 128), jnp.bfloat16)
  unions = spec((1, 2, 1024 // tokens, 1024))
  bits = spec((1, 2, 1024 // tokens, -(-tokens // 32), 1024))
  forward = jax.jit(lambda *a: sparse_attention_forward_mosaic(*a, block_k=64,
                                                               heads_per_program=hp))
  for starts in ([], [spec((1, 1024 * hp))]):   # one document per row; packed documents
    lowered = forward.trace(q, kv, kv, unions, bits, *starts).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
  biased = jax.jit(lambda *a: sparse_attention_forward_mosaic(*a, block_k=64,
                                                              heads_per_program=hp))
  lowered = biased.trace(q, kv, kv, unions, bits, None, spec((1, 2, 1024), jnp.float32)).lower(
      lowering_platforms=("cuda",))                 # NOSA's key bias
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("seq,heads,kv_heads,hp", [
    (72, 32, 2, 16),     # ragged, GQA 16: tiles of 4 tokens, two KV heads
    (130, 8, 1, 2),      # four chunks of 2 heads per tile (32-token tiles), ragged
])
def test_mosaic_dkdv_gradients_match_reference(seq, heads, kv_heads, hp):
  """The Mosaic dK/dV kernel (backward_mosaic.py) in interpret mode: dk and dv of a loss
  through the op against jax.grad of the reference; dq from the Triton kernel as before."""
  q, k, v, idx, valid = _inputs(seq + hp, seq, heads, kv_heads, 64, 3, 64)
  cotangent = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)

  def loss(impl, launch=Launch()):
    def f(q, k, v):
      out, lse = sparse_attention(q, k, v, idx, valid, heads_per_program=hp,
                                  implementation=impl, launch=launch)
      return jnp.sum(out.astype(jnp.float32) * cotangent) + jnp.sum(jnp.where(
          jnp.isfinite(lse), lse, 0.0))
    return jax.grad(f, argnums=(0, 1, 2))

  got = loss("interpret", Launch(dkdv_kernel="mosaic", mosaic_dkdv_stages=2))(q, k, v)
  want = loss("reference")(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=3e-2, rtol=3e-2, err_msg=name)


@pytest.mark.parametrize("hp", [2, 16])
def test_mosaic_dkdv_lowers_for_the_gpu(hp):
  """The dK/dV kernel lowers to Mosaic GPU for CUDA without a GPU (as the forward's test)."""
  from pallas_kernels.sparse_attention.backward_mosaic import dkdv_parts_mosaic
  spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
  t, heads, kv_heads, d = 1024, 32, 2, 128
  rows = spec((1, heads // hp, t * hp, d), jnp.bfloat16)
  kv = spec((1, t, kv_heads, d), jnp.bfloat16)
  vectors = spec((1, heads // hp, t * hp), jnp.float32)
  index = (spec((1, kv_heads, 40, 4)), spec((1, kv_heads, 500)), spec((1, kv_heads, 500)))
  parts = jax.jit(lambda *a: dkdv_parts_mosaic(*a, heads_per_program=hp, group=heads // kv_heads))
  lowered = parts.trace(rows, kv, kv, rows, vectors, vectors, *index).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_mosaic_dkdv_bad_inputs_are_named():
  q, k, v, idx, valid = _inputs(0, 128, 16, 2, 64, 2, 64)
  with pytest.raises(ValueError, match="mosaic_dkdv_stages must be an even int"):
    sparse_attention(q, k, v, idx, valid, launch=Launch(mosaic_dkdv_stages=3))
  with pytest.raises(ValueError, match="dq_atomic needs dkdv_kernel='triton'"):
    sparse_attention(q, k, v, idx, valid, launch=Launch(dkdv_kernel="mosaic", dq_atomic=True))
  with pytest.raises(ValueError, match="heads_per_program must be a power of two in"):
    sparse_attention(q, k, v, idx, valid, heads_per_program=1,
                     launch=Launch(dkdv_kernel="mosaic"))
  with pytest.raises(ValueError, match="needs tiles of 64 rows"):
    sparse_attention(q, k, v, idx, valid, heads_per_program=8, block_q=4,
                     launch=Launch(dkdv_kernel="mosaic"))


def test_auto_picks_the_mosaic_kernels_only_where_they_apply(monkeypatch):
  """Launch's "auto" on a (pretended) Hopper GPU: the Mosaic forward and dK/dV kernels for the
  shapes they take, the Triton ones for packed documents, dq_atomic, other tiles and dtypes;
  never Mosaic off Hopper or outside implementation="pallas"."""
  from pallas_kernels.sparse_attention import op
  q = jax.ShapeDtypeStruct((1, 256, 32, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  auto = Launch(forward_kernel="auto", dkdv_kernel="auto")
  picks = lambda launch=auto, q=q, k=k, hp=16, block=64, block_q=4, impl="pallas", packed=False: (
      op.resolve_forward_kernel(launch, q, k, hp, block, implementation=impl, packed=packed,
                                poison=False),
      op.resolve_dkdv_kernel(launch, q, k, hp, block, block_q, implementation=impl,
                             packed=packed))
  monkeypatch.setattr(op, "_on_hopper", lambda: False)
  assert picks() == ("triton", "triton")
  monkeypatch.setattr(op, "_on_hopper", lambda: True)
  assert picks() == ("mosaic", "mosaic")
  assert picks(impl="interpret") == ("triton", "triton")
  assert picks(packed=True) == ("triton", "triton")
  assert picks(launch=auto._replace(dq_atomic=True)) == ("mosaic", "triton")
  assert picks(hp=1, block_q=64) == ("mosaic", "triton")      # dK/dV needs hp >= 2
  assert picks(hp=8, block_q=4) == ("mosaic", "triton")       # dK/dV needs 64-row tiles
  assert picks(block=128) == ("mosaic", "triton")             # dK/dV needs blocks of 64
  f32 = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  assert picks(q=f32, k=jax.ShapeDtypeStruct(k.shape, jnp.float32)) == ("triton", "triton")
  assert picks(launch=Launch(forward_kernel="triton", dkdv_kernel="triton")) == ("triton",
                                                                                  "triton")
