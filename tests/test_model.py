"""The decoder LM: attention semantics, KV-cache decoding, packing, input validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ModelConfig
from sparsejax.layers.kv_cache import KVCache
from sparsejax.model import DecoderLM
from sparsejax.ops.attention import cudnn_takes, dense_attention, segment_runs


def small_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
              ffn_hidden=96, max_seq_len=64, dtype="float32")
  return ModelConfig(**(base | overrides))


def naive_attention(q, k, v, segment_ids):
  """Loop-free but unfused float64 numpy reference, independent of the op under test."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, d = q.shape
  group = n // k.shape[2]
  k = np.repeat(k, group, axis=2)
  v = np.repeat(v, group, axis=2)
  s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
  seg = np.asarray(segment_ids)
  mask = (np.arange(t)[:, None] >= np.arange(t)[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnd->btnd", p, v)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1), (16, 1)])
def test_dense_attention_matches_naive(num_heads, num_kv_heads):
  rng = np.random.default_rng(num_heads * 10 + num_kv_heads)
  b, t, d = 2, 23, 8
  q = rng.standard_normal((b, t, num_heads, d), np.float32)
  k = rng.standard_normal((b, t, num_kv_heads, d), np.float32)
  v = rng.standard_normal((b, t, num_kv_heads, d), np.float32)
  seg = np.array([[1] * 10 + [2] * 9 + [0] * 4, [1] * 23], np.int32)
  out = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                        segment_ids=jnp.asarray(seg), implementation="xla")
  np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, seg), rtol=2e-5, atol=2e-5)


def test_segment_runs_packed_layout():
  seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  seqlens, offsets, num_runs = segment_runs(seg, max_segments=4)
  np.testing.assert_array_equal(seqlens, [[2, 3, 1, -1], [6, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1]])
  np.testing.assert_array_equal(num_runs, [3, 1])


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (4, 1), (16, 1)])
def test_cached_decode_equals_full_forward(num_heads, num_kv_heads):
  cfg = small_config(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
  full, _, _ = model(tokens)
  cache = KVCache.init(num_layers=cfg.num_layers, batch=2, capacity=24,
                       num_kv_heads=num_kv_heads, head_dim=cfg.head_dim, dtype=jnp.float32)
  prefix, _, cache = model(tokens[:, :12], cache=cache)
  pieces = [prefix]
  for t in range(12, 20):
    step, _, cache = model(tokens[:, t:t + 1], cache=cache)
    pieces.append(step)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(cache.lengths, [20, 20])


def test_cached_decode_with_packed_multi_document_rows():
  cfg = small_config()
  model = DecoderLM(cfg, rngs=nnx.Rngs(3))
  tokens = jax.random.randint(jax.random.key(4), (2, 18), 0, cfg.vocab_size)
  seg = jnp.array([[1] * 7 + [2] * 11, [1] * 3 + [2] * 5 + [3] * 10], jnp.int32)
  pos = jnp.array([list(range(7)) + list(range(11)),
                   list(range(3)) + list(range(5)) + list(range(10))], jnp.int32)
  full, _, _ = model(tokens, positions=pos, segment_ids=seg)
  cache = KVCache.init(num_layers=cfg.num_layers, batch=2, capacity=18, num_kv_heads=2,
                       head_dim=cfg.head_dim, dtype=jnp.float32)
  prefix, _, cache = model(tokens[:, :10], positions=pos[:, :10], segment_ids=seg[:, :10],
                           cache=cache)
  pieces = [prefix]
  for t in range(10, 18):
    step, _, cache = model(tokens[:, t:t + 1], positions=pos[:, t:t + 1],
                           segment_ids=seg[:, t:t + 1], cache=cache)
    pieces.append(step)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_packing_isolates_documents():
  cfg = small_config()
  model = DecoderLM(cfg, rngs=nnx.Rngs(5))
  tokens = jax.random.randint(jax.random.key(6), (1, 24), 0, cfg.vocab_size)
  seg = jnp.array([[1] * 9 + [2] * 15], jnp.int32)
  pos = jnp.array([list(range(9)) + list(range(15))], jnp.int32)
  changed = tokens.at[0, :9].set((tokens[0, :9] + 1) % cfg.vocab_size)
  a, _, _ = model(tokens, positions=pos, segment_ids=seg)
  b, _, _ = model(changed, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(a[0, 9:], b[0, 9:], rtol=1e-6, atol=1e-6)  # document 2 unchanged
  assert not np.allclose(a[0, :9], b[0, :9])  # document 1 did change
  # And document 2 packed after document 1 equals document 2 on its own.
  alone, _, _ = model(tokens[:, 9:])
  np.testing.assert_allclose(a[0, 9:], alone[0], rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_fp32_params():
  cfg = small_config(dtype="bfloat16")
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits, _, _ = model(jnp.zeros((1, 8), jnp.int32))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_tied_embeddings_have_no_head():
  model = DecoderLM(small_config(tie_embeddings=True), rngs=nnx.Rngs(0))
  assert not hasattr(model, "head")
  logits, _, _ = model(jnp.zeros((1, 4), jnp.int32))
  assert logits.shape == (1, 4, 97)


@pytest.mark.parametrize("overrides,match", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads=6 must be a multiple of num_kv_heads=4"),
    (dict(num_kv_heads=0), "num_kv_heads must be a positive int"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(dtype="int8"), "dtype must be"),
])
def test_bad_model_config(overrides, match):
  with pytest.raises(ValueError, match=match):
    small_config(**overrides)


def test_unknown_attention_kind_names_the_slot():
  with pytest.raises(ValueError, match=r"ModelConfig.attention='nope' is not registered"):
    DecoderLM(small_config(attention="nope"), rngs=nnx.Rngs(0))


def test_sequence_longer_than_max_seq_len():
  model = DecoderLM(small_config(max_seq_len=16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="sequence length 17 exceeds ModelConfig.max_seq_len=16"):
    model(jnp.zeros((1, 17), jnp.int32))


def test_bad_attention_inputs():
  q = jnp.zeros((1, 4, 3, 8))
  k = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="num_heads=3 .* must be a multiple of num_kv_heads=2"):
    dense_attention(q, k, k)
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    dense_attention(jnp.zeros((1, 4, 2, 8)), k, k, segment_ids=jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="supports causal self-attention"):
    dense_attention(jnp.zeros((1, 1, 2, 8)), k, k, q_start=jnp.array([3]), implementation="cudnn")


def test_automatic_choice_leaves_cudnn_what_it_rejects():
  """On a GPU, implementation=None picks cuDNN only for operands it accepts: a float32 model (the
  notebooks') or an odd head dim takes the xla path instead of raising inside jax."""
  x = lambda dtype, d: jnp.zeros((1, 4, 2, d), dtype)
  assert cudnn_takes(x(jnp.bfloat16, 128), x(jnp.bfloat16, 128), x(jnp.bfloat16, 128))
  assert cudnn_takes(x(jnp.float16, 64), x(jnp.float16, 64), x(jnp.float16, 64))
  assert not cudnn_takes(x(jnp.float32, 64), x(jnp.float32, 64), x(jnp.float32, 64))
  assert not cudnn_takes(x(jnp.bfloat16, 64), x(jnp.float32, 64), x(jnp.bfloat16, 64))
  assert not cudnn_takes(x(jnp.bfloat16, 12), x(jnp.bfloat16, 12), x(jnp.bfloat16, 12))
  assert not cudnn_takes(x(jnp.bfloat16, 512), x(jnp.bfloat16, 512), x(jnp.bfloat16, 512))


def test_from_dict_rejects_unknown_fields():
  with pytest.raises(ValueError, match=r"unknown fields \['num_layerz'\]"):
    ModelConfig.from_dict({"num_layerz": 2})


def test_sliding_window_attention():
  """The window mask against a naive one, decode equals prefill, and a window as long as the
  sequence equals dense attention with the same parameters."""
  q, k, v = (jax.random.normal(key, (1, 20, 2, 8)) for key in jax.random.split(jax.random.key(0), 3))
  out = dense_attention(q, k, v, window=5, implementation="xla")
  s = np.einsum("btnd,bsnd->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(8)
  t = np.arange(20)
  s = np.where(((t[:, None] >= t[None]) & (t[:, None] - t[None] < 5))[None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

  window = lambda w: small_config(attention="sliding_window", attention_options=(("window", w),))
  model = DecoderLM(window(6), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
  full, _, _ = model(tokens)
  cache = KVCache.init(num_layers=2, batch=2, capacity=16, num_kv_heads=2, head_dim=16,
                       dtype=jnp.float32)
  pieces = [model(tokens[:, :10], cache=cache)]
  for t in range(10, 16):
    pieces.append(model(tokens[:, t:t + 1], cache=pieces[-1][2]))
  np.testing.assert_allclose(jnp.concatenate([p[0] for p in pieces], 1), full, rtol=1e-4, atol=1e-4)
  dense = DecoderLM(small_config(), rngs=nnx.Rngs(0))
  wide = DecoderLM(window(16), rngs=nnx.Rngs(0))  # same seed: same parameters
  np.testing.assert_allclose(wide(tokens)[0], dense(tokens)[0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(full, dense(tokens)[0], atol=1e-3)
  with pytest.raises(ValueError, match="needs attention_options=\\{'window'"):
    DecoderLM(small_config(attention="sliding_window"), rngs=nnx.Rngs(0))
