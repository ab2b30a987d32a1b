"""NOSA (sparsejax.ops.nosa, attention="nosa"): the eviction head, its pooled block scores, the
split selection, the biased sparse attention, and the layer in the model."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.layers.kv_cache import KVCache
from sparsejax.model import DecoderLM
from sparsejax.ops import infllmv2
from sparsejax.ops.nosa import (NOSAConfig, block_eviction_scores, eviction_scores,
                                nosa_attention, nosa_select_blocks)
from tests.test_infllmv2_layer import trains_and_generates
from tests.test_model import small_config

# Blocks of 8 with windows of 4 every 2: at 56 tokens 7 blocks, 2 of them query-aware forced,
# one more query-aware, one query-agnostic.
CFG = NOSAConfig(block_size=8, compress_window=4, compress_stride=2, lse_window=8, lse_stride=4,
                 init_blocks=1, local_blocks=2, query_topk=4, topk=5)


def _inputs(key, b=2, t=56, heads=4, kvh=2, d=16):
  kq, kk, kv, ke = jax.random.split(key, 4)
  return (jax.random.normal(kq, (b, t, heads, d)), jax.random.normal(kk, (b, t, kvh, d)),
          jax.random.normal(kv, (b, t, kvh, d)), 2.0 * jax.random.normal(ke, (b, t, kvh)))


def test_config_checks():
  for bad, match in [(dict(query_topk=2), "query_topk=2 must lie between"),
                     (dict(query_topk=6), "query_topk=6 must lie between"),
                     (dict(local_blocks=1, query_topk=3), "local_blocks must be >= 2"),
                     (dict(dense_len=8), "dense_len must be 0")]:
    with pytest.raises(ValueError, match=match):
      NOSAConfig(**(dict(block_size=8, compress_window=4, compress_stride=2, lse_window=8,
                         lse_stride=4, init_blocks=1, local_blocks=2, query_topk=4, topk=5)
                    | bad))
  assert CFG.query_aware().topk == 4 and type(CFG.query_aware()) is infllmv2.InfLLMv2Config


def test_eviction_scores_formula_and_checks():
  v = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  proj = jax.random.normal(jax.random.key(1), (3, 4, 3))
  scale = jnp.array([0.5, -1.0, 2.0])
  pre = np.einsum("bsf,fo->bso", np.asarray(v).reshape(2, 5, 12), np.asarray(proj).reshape(12, 3))
  np.testing.assert_allclose(eviction_scores(v, scale, proj),
                             np.asarray(scale) * np.log1p(np.exp(pre)), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="proj must be"):
    eviction_scores(v, scale, proj[:, :2])
  with pytest.raises(ValueError, match="scale must be"):
    eviction_scores(v, scale[:2], proj)


def _pooled_by_hand(scores, cfg, seg):
  """Loops: the mean of every segment-uniform window, the max over the windows overlapping a
  block (lowest float when none)."""
  b, n, kvh = scores.shape
  w, s, B = cfg.compress_window, cfg.compress_stride, cfg.block_size
  nb = -(-n // B)
  out = np.full((b, kvh, nb), np.finfo(np.float32).min, np.float32)
  for r in range(b):
    for i in range((n - w) // s + 1):
      lo, hi = i * s, i * s + w
      if len(set(seg[r, lo:hi])) > 1:
        continue
      mean = scores[r, lo:hi].mean(axis=0)
      for j in range(nb):
        if lo < (j + 1) * B and hi > j * B:
          out[r, :, j] = np.maximum(out[r, :, j], mean)
  return out


def test_block_eviction_scores_pool_by_window_then_block():
  scores = np.asarray(jax.random.normal(jax.random.key(2), (2, 53, 2)), np.float32)
  seg = np.array([[1] * 21 + [2] * 32, [1] * 53], np.int32)
  got = block_eviction_scores(jnp.asarray(scores), CFG, segment_ids=jnp.asarray(seg))
  np.testing.assert_allclose(got, _pooled_by_hand(scores, CFG, seg), rtol=1e-6)


def _select_by_hand(q, k, evict, cfg, seg):
  """The split by definition: InfLLM-V2's selection at query_topk, then the best eviction
  scores among the other eligible blocks (lower index first on ties), as sets."""
  aware = cfg.query_aware()
  scores = infllmv2.block_scores(q, k, aware, segment_ids=seg)
  idx, valid = infllmv2.select_blocks(scores, aware, q_len=q.shape[1], kv_len=k.shape[1],
                                      segment_ids=seg)
  eligible = np.asarray(infllmv2.eligible_blocks(cfg, batch=q.shape[0], q_len=q.shape[1],
                                                 kv_len=k.shape[1], segment_ids=seg))
  pooled = _pooled_by_hand(np.asarray(evict), cfg, np.asarray(seg))
  b, t, kvh = idx.shape[:3]
  sets = {}
  for r in range(b):
    for i in range(t):
      for h in range(kvh):
        chosen = set(np.asarray(idx[r, i, h])[np.asarray(valid[r, i, h])].tolist())
        rest = [j for j in np.flatnonzero(eligible[r, i]) if j not in chosen]
        rest.sort(key=lambda j: (-pooled[r, h, j], j))
        sets[r, i, h] = chosen | set(rest[:cfg.topk - len(chosen)])
  return sets


def test_selection_is_query_aware_plus_best_eviction_scores():
  q, k, _, evict = _inputs(jax.random.key(3))
  seg = jnp.array([[1] * 20 + [2] * 36, [1] * 56], jnp.int32)
  idx, valid = nosa_select_blocks(q, k, evict, CFG, segment_ids=seg)
  want = _select_by_hand(q, k, evict, CFG, seg)
  for (r, i, h), blocks in want.items():
    row = np.asarray(idx[r, i, h])
    got = row[np.asarray(valid[r, i, h])]
    assert list(got) == sorted(blocks), (r, i, h)
    assert (row[len(got):] == -1).all()
  # Late queries of the long row have more eligible blocks than slots: all slots are used.
  assert np.asarray(valid[1, -1]).all()


def test_zero_scale_takes_the_oldest_blocks():
  q, k, v, _ = _inputs(jax.random.key(4), b=1)
  zero = eviction_scores(v, jnp.zeros(2), jax.random.normal(jax.random.key(5), (2, 16, 2)))
  aware_idx, aware_valid = infllmv2.select_blocks(
      infllmv2.block_scores(q, k, CFG.query_aware()), CFG.query_aware(), q_len=56, kv_len=56)
  idx, valid = nosa_select_blocks(q, k, zero, CFG)
  for h in range(2):
    chosen = set(np.asarray(aware_idx[0, -1, h]).tolist())
    extra = sorted(set(np.asarray(idx[0, -1, h]).tolist()) - chosen)
    assert extra == [j for j in range(7) if j not in chosen][:1]


def _biased_attention_by_hand(q, k, v, evict, idx, valid, block_size, seg):
  q, k, v, evict = (np.asarray(x, np.float64) for x in (q, k, v, evict))
  b, t, n, d = q.shape
  kvh = k.shape[2]
  out = np.zeros_like(q)
  for r in range(b):
    for i in range(t):
      for head in range(n):
        h = head // (n // kvh)
        blocks = np.asarray(idx[r, i, h])[np.asarray(valid[r, i, h])]
        keys = [s for s in range(i + 1) if s // block_size in blocks and seg[r, s] == seg[r, i]]
        logits = k[r, keys, h] @ q[r, i, head] / math.sqrt(d) + evict[r, keys, h]
        p = np.exp(logits - logits.max())
        out[r, i, head] = (p / p.sum()) @ v[r, keys, h]
  return out


def test_attention_adds_the_eviction_score_to_the_selected_logits():
  q, k, v, evict = _inputs(jax.random.key(6))
  seg = jnp.array([[1] * 20 + [2] * 36, [1] * 56], jnp.int32)
  out = nosa_attention(q, k, v, evict, CFG, segment_ids=seg)
  idx, valid = nosa_select_blocks(q, k, evict, CFG, segment_ids=seg)
  want = _biased_attention_by_hand(q, k, v, evict, idx, valid, CFG.block_size, np.asarray(seg))
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"key_bias must be a float array \[batch, kv_len"):
    nosa_attention(q, k, v, evict[:, :, :1], CFG)


def test_eviction_head_learns_through_the_bias_only():
  q, k, v, _ = _inputs(jax.random.key(7), b=1)
  proj = jax.random.normal(jax.random.key(8), (2, 16, 2))

  def loss(scale, proj):
    return jnp.sum(nosa_attention(q, k, v, eviction_scores(v, scale, proj), CFG) ** 2)

  d_scale, d_proj = jax.grad(loss, argnums=(0, 1))(jnp.zeros(2), proj)
  assert np.abs(d_scale).min() > 0          # A = 0 still learns,
  assert not np.asarray(d_proj).any()       # W_delta only once A moves (as in the paper)
  d_scale, d_proj = jax.grad(loss, argnums=(0, 1))(jnp.array([0.5, -0.3]), proj)
  assert np.abs(d_proj).sum() > 0


# ---------------------------------------------------------------------------------------------
# The layer

OPTIONS = dict(block_size=8, compress_window=4, compress_stride=2, lse_window=8, lse_stride=4,
               init_blocks=1, local_blocks=2, query_topk=4, topk=5)


def nosa_config(**options):
  return small_config(attention="nosa", max_seq_len=128,
                      attention_options=tuple(sorted((OPTIONS | options).items())))


def test_layer_adds_two_parameters_and_decode_matches_prefill():
  dense = DecoderLM(small_config(), rngs=nnx.Rngs(0))
  model = DecoderLM(nosa_config(), rngs=nnx.Rngs(0))
  attn = nnx.to_pure_dict(nnx.state(model.blocks[0].attn, nnx.Param))
  assert set(attn) - set(nnx.to_pure_dict(nnx.state(dense.blocks[0].attn, nnx.Param))) == {
      "evict_proj", "evict_scale"}
  assert attn["evict_proj"].shape == (2, 16, 2) and not np.asarray(attn["evict_scale"]).any()
  for block in model.blocks:  # a trained head: nonzero scores
    block.attn.evict_scale[...] = jnp.array([1.5, -0.7])
  tokens = jax.random.randint(jax.random.key(1), (2, 56), 0, 97)
  full, _, _ = model(tokens)
  cfg = model.config
  cache = KVCache.for_model(cfg, batch=2, capacity=56)
  assert cache.layers[0].kc is not None and cache.layers[0].evict.shape == (2, 56, 2)
  prefix, _, cache = model(tokens[:, :36], cache=cache)
  pieces = [prefix]
  for t in range(36, 44):   # crosses into block 5 at 40
    step, _, cache = model(tokens[:, t:t + 1], cache=cache)
    pieces.append(step)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full[:, :44], rtol=1e-4, atol=1e-4)
  # The cache holds every written token's score, as the head gives it from the cached values.
  layer = cache.layers[0]
  np.testing.assert_allclose(layer.evict[:, :44],
                             model.blocks[0].attn.eviction_scores(layer.v)[:, :44],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_kernel_path_equals_reference_path(packed):
  """Prefill and decode through the interpret-mode kernels (scoring, top-k, biased block-sparse
  attention and decode) against the jnp reference, with a trained-looking head."""
  options = dict(OPTIONS, block_size=16, compress_window=8, compress_stride=4, lse_window=16,
                 lse_stride=8, query_topk=3, topk=4)
  models = {}
  for kernel in ("reference", "interpret"):
    models[kernel] = DecoderLM(nosa_config(kernel=kernel, **options), rngs=nnx.Rngs(5))
    for block in models[kernel].blocks:
      block.attn.evict_scale[...] = jnp.array([1.5, -0.7])
  tokens = jax.random.randint(jax.random.key(4), (2, 80), 0, 97)
  kw = {}
  if packed:
    kw = dict(segment_ids=jnp.array([[1] * 30 + [2] * 50, [1] * 80], jnp.int32),
              positions=jnp.array([list(range(30)) + list(range(50)), list(range(80))],
                                  jnp.int32))
  outs = {name: m(tokens, **kw)[0] for name, m in models.items()}
  np.testing.assert_allclose(outs["interpret"], outs["reference"], rtol=2e-4, atol=2e-4)
  steps = {}
  for name, m in models.items():
    cache = KVCache.for_model(m.config, batch=2, capacity=80)
    part = lambda lo, hi: {name: x[:, lo:hi] for name, x in kw.items()}
    _, _, cache = m(tokens[:, :62], cache=cache, **part(0, 62))
    pieces = []
    for t in range(62, 66):   # crosses into block 4 at 64
      step, _, cache = m(tokens[:, t:t + 1], cache=cache, **part(t, t + 1))
      pieces.append(step)
    steps[name] = jnp.concatenate(pieces, 1)
  np.testing.assert_allclose(steps["interpret"], steps["reference"], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(steps["reference"], outs["reference"][:, 62:66], rtol=2e-4,
                             atol=2e-4)


def test_sparse_decode_kernel_adds_the_bias():
  from pallas_kernels.sparse_decode import sparse_decode
  keys = jax.random.split(jax.random.key(9), 5)
  b, cap, kvh, g, d = 3, 200, 2, 4, 16
  q = jax.random.normal(keys[0], (b, kvh * g, d))
  k, v = (jax.random.normal(x, (b, cap, kvh, d)) for x in keys[1:3])
  bias = 2.0 * jax.random.normal(keys[3], (b, cap, kvh))
  idx = jnp.array([[[0, 2, 3, -1], [1, 3, -1, -1]]] * b, jnp.int32)
  lengths = jnp.array([200, 150, 61], jnp.int32)
  got = sparse_decode(q, k, v, idx, None, lengths, block_size=64, key_bias=bias,
                      implementation="interpret", num_splits=2)
  want = sparse_decode(q, k, v, idx, None, lengths, block_size=64, key_bias=bias,
                       implementation="reference")
  for x, y in zip(got, want):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  plain = sparse_decode(q, k, v, idx, None, lengths, block_size=64, implementation="reference")
  assert not np.allclose(want[0], plain[0], atol=1e-3)
  with pytest.raises(ValueError, match=r"key_bias must be a float array \[batch, capacity"):
    sparse_decode(q, k, v, idx, None, lengths, key_bias=bias[:, :10])
  with pytest.raises(ValueError, match="kernel='mosaic' takes no key_bias"):
    sparse_decode(q, k, v, idx, None, lengths, key_bias=bias, kernel="mosaic")


def test_trains_and_generates(tmp_path):
  model = trains_and_generates(tmp_path, "nosa", OPTIONS)
  scale = model.blocks[0].attn.evict_scale[...]
  assert np.abs(np.asarray(scale)).sum() > 0   # A moved: the head is trained


def test_unknown_option_is_named():
  with pytest.raises(ValueError, match=r"unknown keys \['top_k'\] for attention='nosa'"):
    DecoderLM(nosa_config(top_k=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dense_len must be 0"):
    DecoderLM(nosa_config(dense_len=64), rngs=nnx.Rngs(0))


def test_continues_a_dense_run_with_the_head_freshly_initialised(tmp_path):
  from tests.test_train import micro_config
  from sparsejax.train.trainer import Trainer
  src = Trainer(micro_config(tmp_path / "dense"), progress=False)
  src.params = jax.tree.map(lambda x: x + 0.5, src.params)  # weights no init would produce
  src.save(wait=True)
  src.close()
  cfg = micro_config(tmp_path / "nosa")
  cfg.model.attention, cfg.model.attention_options = "nosa", dict(OPTIONS)
  cfg.train.init_from = str(tmp_path / "dense")
  with pytest.raises(ValueError, match=r"train.init_from=.*missing from the checkpoint.*evict"):
    Trainer(cfg, progress=False)
  cfg.train.new_params = "evict_proj,evict_scale"
  dst = Trainer(cfg, progress=False)
  try:
    for path, leaf in jax.tree_util.tree_leaves_with_path(dst.params):
      name = jax.tree_util.keystr(path)
      if "evict_scale" in name:
        assert not np.asarray(leaf).any()            # A = 0: the init
      elif "evict_proj" in name:
        assert 0 < np.abs(np.asarray(leaf)).std() < 0.1   # the normal init, not + 0.5
      else:
        src_leaf = src.params
        for key in path:
          src_leaf = src_leaf[key.key]
        np.testing.assert_array_equal(leaf, src_leaf)
  finally:
    dst.close()


def test_overlap_counts_kept_and_new_blocks():
  from sparsejax.eval.locality import overlap
  idx = np.array([[[0, 3, 5, -1]], [[0, 4, 5, -1]], [[0, 4, 5, 6]]])
  valid = idx >= 0
  o = overlap(idx, valid)
  assert o["hits"].tolist() == [[2], [3]] and o["new"].tolist() == [[1], [1]]
  assert o["size"].tolist() == [[3], [4]]


def test_selection_locality_of_both_rules():
  from sparsejax.eval.locality import selection_locality
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (120,), 0, 97))
  # Every block selected: a step keeps all of the last one's blocks and adds its own new block
  # when it crosses into one (steps at 104..119, blocks of 8: one crossing, at 112, in the 15
  # transitions).
  everything = DecoderLM(nosa_config(query_topk=15, topk=15), rngs=nnx.Rngs(0))
  for row in selection_locality(everything, tokens, steps=16):
    assert row["new_blocks"] == pytest.approx(1 / 15)
    assert row["hit_rate"] == pytest.approx((14 + 14 / 15) / 15)
  for attention, options in (("nosa", OPTIONS), ("infllmv2", dict(
      block_size=8, compress_window=4, compress_stride=2, lse_window=8, lse_stride=4,
      init_blocks=1, local_blocks=2, topk=5, dense_len=0))):
    model = DecoderLM(small_config(attention=attention, max_seq_len=128,
                                   attention_options=tuple(sorted(options.items()))),
                      rngs=nnx.Rngs(1))
    rows = selection_locality(model, tokens, steps=16)
    assert len(rows) == 2
    for row in rows:
      assert row["selected"] == 5 and 0 <= row["hit_rate"] <= 1
      assert row["new_blocks"] == pytest.approx(row["selected"] * (1 - row["hit_rate"]), abs=1e-6)
