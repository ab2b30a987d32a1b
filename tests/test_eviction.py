"""KV-cache eviction (issue 6): the evicting cache, the scorers, chunked prefill + decoding, the
sweep binary. Tiny models on the CPU."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.inference import generate
from sparsejax.inference.eviction import (EvictionConfig, generate_with_eviction,
                                          prefill_with_eviction)
from sparsejax.inference.eviction_cache import EvictingLayerKV, evict
from sparsejax.inference.scorers import SCORERS
from sparsejax.model import DecoderLM
from tests.test_experiments import run as run_module
from tests.test_model import small_config

RNG = np.random.RandomState(0)
PROMPTS = [[int(x) for x in RNG.randint(0, 97, size=n)] for n in (29, 41, 7)]


class KeyScoreHeads(nnx.Module):
  """Test double of RetainingHeads (same call): a token's score on KV head h is the first
  component of its pre-RoPE key on that head."""

  def __init__(self, num_kv_heads: int):
    self.scale = nnx.Param(jnp.ones((num_kv_heads,), jnp.float32))

  def __call__(self, layer, q_pre, k_pre, v):
    del layer, q_pre, v
    return k_pre[..., 0].astype(jnp.float32) * self.scale[...]


@pytest.fixture(scope="module")
def model2():
  return DecoderLM(small_config(max_seq_len=256), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model1():
  # Larger weights than the default init, so attention (and so RoPE positions) matter.
  return DecoderLM(small_config(max_seq_len=256, num_layers=1, init_std=0.3), rngs=nnx.Rngs(1))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions):
  logits, _, _ = nnx.merge(graphdef, state)(tokens, positions=positions)
  return logits


def forward(model, tokens, positions=None) -> jax.Array:
  """The model's own full-attention forward (jitted: one compilation instead of op by op)."""
  tokens = jnp.asarray(tokens)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return _forward(*nnx.split(model), tokens, jnp.asarray(positions))


@pytest.fixture(scope="module")
def full_logits(model2):
  """Full-attention logits at each prompt's last token: one right-padded forward (causal, so
  the padding after a prompt does not change its logits)."""
  width = max(map(len, PROMPTS))
  logits = forward(model2, [p + [0] * (width - len(p)) for p in PROMPTS])
  return np.stack([logits[i, len(p) - 1] for i, p in enumerate(PROMPTS)])


def live(layer: EvictingLayerKV, b: int, h: int, field: str = "positions") -> np.ndarray:
  return np.asarray(getattr(layer, field)[b, h, :int(layer.lengths[b, h])])


# Every scorer with a budget above prompt + continuation, each with another combination of the
# options (position mode, decode mode, Locret's undisturbed local tail), all equal to `generate`.
FULL_CASES = {
    "locret": dict(position_mode="original", decode_mode="grow", local_len=0),
    "snapkv": dict(position_mode="contiguous", decode_mode="evict", local_len=3),
    "h2o": dict(position_mode="original", decode_mode="evict", local_len=0),
    "streaming": dict(position_mode="contiguous", decode_mode="grow", local_len=0),
    "random": dict(position_mode="original", decode_mode="grow", local_len=0),
}


@pytest.mark.parametrize("scorer", sorted(FULL_CASES))
def test_budget_at_least_prompt_equals_full_attention(scorer, model2, full_logits):
  assert set(FULL_CASES) == set(SCORERS)
  heads = KeyScoreHeads(2) if scorer == "locret" else None
  config = EvictionConfig(scorer=scorer, budget=64, chunk_size=8, n_stabilizers=2, n_sinks=1,
                          **FULL_CASES[scorer])
  pre = prefill_with_eviction(model2, PROMPTS, config=config, heads=heads, decode_tokens=5)
  np.testing.assert_allclose(pre.last_logits, full_logits, atol=2e-5, rtol=2e-5)
  out = generate_with_eviction(model2, PROMPTS, config=config, heads=heads, max_new_tokens=5)
  assert out == generate(model2, PROMPTS, max_new_tokens=5)


def test_evict_keeps_exactly_b_per_head_and_the_right_ones():
  batch, heads, cap = 2, 3, 12
  rng = np.random.RandomState(1)
  lengths = np.array([[10, 7, 12], [3, 10, 0]], np.int32)
  positions = np.broadcast_to(np.arange(cap) * 2 + 5, (batch, heads, cap)).astype(np.int32)
  scores = np.stack([[rng.permutation(cap) for _ in range(heads)] for _ in range(batch)])
  scores = scores.astype(np.float32)
  k = np.broadcast_to(positions[..., None], (batch, heads, cap, 4)).astype(np.float32)
  layer = EvictingLayerKV(jnp.asarray(k), jnp.asarray(-k), jnp.asarray(positions),
                          jnp.asarray(scores), jnp.asarray(lengths))
  budget = np.array([4, 2, 6])  # a different budget on every head

  evict_jit = jax.jit(evict)  # one compilation for both calls
  out = evict_jit(layer, jnp.asarray(budget), 0, 0)
  for b in range(batch):
    for h in range(heads):
      n = lengths[b, h]
      want = min(budget[h], n)
      assert int(out.lengths[b, h]) == want
      top = np.sort(np.argsort(-scores[b, h, :n], kind="stable")[:want])  # slots, position order
      np.testing.assert_array_equal(live(out, b, h), positions[b, h, top])
      np.testing.assert_array_equal(live(out, b, h, "scores"), scores[b, h, top])
      np.testing.assert_array_equal(live(out, b, h, "k")[:, 0], positions[b, h, top])
      np.testing.assert_array_equal(live(out, b, h, "v")[:, 0], -positions[b, h, top])

  # Stabilizers (the 2 most recent live entries) and sinks (positions < 9: slots 0 and 1) are
  # kept even with the lowest scores; the rest of each budget goes to the best of the others.
  rows = ((0, 0), (0, 2), (1, 1))  # (row, head) pairs with at least 4 live entries
  low = scores.copy()
  for b, h in rows:
    n = lengths[b, h]
    low[b, h, [0, 1, n - 2, n - 1]] = [-4, -3, -2, -1]
  out = evict_jit(layer.replace(scores=jnp.asarray(low)), jnp.asarray(budget + 2), 2, 9)
  for b, h in rows:
    n, want = lengths[b, h], budget[h] + 2
    kept = set(live(out, b, h).tolist())
    protected = {5, 7, positions[b, h, n - 2], positions[b, h, n - 1]}
    best = sorted(range(2, n - 2), key=lambda s: -low[b, h, s])[:want - 4]
    assert len(kept) == want and kept == protected | set(positions[b, h, best].tolist())


@pytest.mark.parametrize("mode", ["original", "contiguous"])
def test_positions_after_eviction(mode, model1):
  """One layer: a token's pre-RoPE k, v depend on that token only, so after eviction the prompt's
  last token (alone in the last chunk) must see exactly what a plain forward over the kept tokens
  sees at the kept tokens' positions: the original ones, or re-numbered 0..n-1."""
  prompt = PROMPTS[1][:33]  # 4 chunks of 8, then the last token
  config = EvictionConfig(scorer="streaming", budget=10, chunk_size=8, n_sinks=2,
                          position_mode=mode)
  pre = prefill_with_eviction(model1, [prompt], config=config)
  for h in range(2):  # after the last eviction: the sinks and the 8 most recent positions
    np.testing.assert_array_equal(live(pre.caches[0], 0, h), [0, 1] + list(range(25, 33)))
  seen = [0, 1] + list(range(24, 33))  # what the last token attended to (itself included)
  tokens = [[prompt[i] for i in seen]]
  positions = seen if mode == "original" else list(range(len(seen)))
  ref = forward(model1, tokens, [positions])
  np.testing.assert_allclose(pre.last_logits[0], ref[0, -1], atol=2e-5, rtol=2e-5)
  other = seen if mode == "contiguous" else list(range(len(seen)))
  wrong = forward(model1, tokens, [other])
  assert not np.allclose(pre.last_logits[0], wrong[0, -1], atol=1e-3)


def test_locret_scores_keep_the_top_b_tokens_per_head(model1):
  """With a fixed score per token (Locret's), chunk-by-chunk eviction keeps the prompt's top-b
  tokens of each KV head, under a different budget per head."""
  prompt = PROMPTS[1][:40]
  heads = KeyScoreHeads(2)
  config = EvictionConfig(scorer="locret", budget=(5, 9), chunk_size=8)
  pre = prefill_with_eviction(model1, [prompt], config=config, heads=heads)
  block = model1.blocks[0]
  x = model1.embed[...][jnp.asarray([prompt])]
  _, k, _ = block.attn.project_qkv(block.attn_norm(x))
  for h, b in enumerate((5, 9)):
    want = np.sort(np.argsort(-np.asarray(k[0, :, h, 0]))[:b])
    np.testing.assert_array_equal(live(pre.caches[0], 0, h), want)


def test_chunked_prefill_without_eviction_equals_single_prefill(model2):
  single = prefill_with_eviction(model2, PROMPTS, config=EvictionConfig(
      scorer="h2o", budget=64, chunk_size=64))
  chunked = prefill_with_eviction(model2, PROMPTS, config=EvictionConfig(
      scorer="h2o", budget=64, chunk_size=8))
  assert single.stats.num_chunks == 1 and chunked.stats.num_chunks == 6
  np.testing.assert_allclose(chunked.last_logits, single.last_logits, atol=2e-5, rtol=2e-5)
  for a, b in zip(chunked.caches, single.caches):
    np.testing.assert_array_equal(a.lengths, b.lengths)
    for row in range(len(PROMPTS)):
      for h in range(2):
        np.testing.assert_array_equal(live(a, row, h), np.arange(len(PROMPTS[row])))
        np.testing.assert_allclose(live(a, row, h, "k"), live(b, row, h, "k"), atol=2e-5)
        np.testing.assert_allclose(live(a, row, h, "v"), live(b, row, h, "v"), atol=2e-5)
        # H2O's accumulated attention is the same sum whichever way the queries were chunked.
        np.testing.assert_allclose(live(a, row, h, "scores"), live(b, row, h, "scores"),
                                   atol=1e-4)


def test_ragged_batch_equals_each_prompt_alone(model2):
  """Right padding under eviction: a prompt in a batch with longer and shorter ones keeps the same
  entries, scores and logits as alone (padding is never cached nor counted in H2O's sums)."""
  config = EvictionConfig(scorer="h2o", budget=16, chunk_size=8, n_stabilizers=2, n_sinks=1)
  batch = prefill_with_eviction(model2, PROMPTS, config=config)
  for row in (0, 1):  # 29 and 41 tokens; the batch also holds a 7-token prompt
    alone = prefill_with_eviction(model2, [PROMPTS[row]], config=config)
    np.testing.assert_allclose(batch.last_logits[row], alone.last_logits[0], atol=2e-5)
    for a, b in zip(batch.caches, alone.caches):
      for h in range(2):
        np.testing.assert_array_equal(live(a, row, h), live(b, 0, h))
        np.testing.assert_allclose(live(a, row, h, "scores"), live(b, 0, h, "scores"), atol=1e-5)
  assert [int(x) for x in batch.caches[0].lengths[:, 0]] == [16, 16, 7]


def test_peak_cache_is_independent_of_prompt_length(model1):
  """Per-head budgets (6, 10), stabilizers and sinks: 40 or 120 prompt tokens, the same cache."""
  config = EvictionConfig(scorer="h2o", budget=(6, 10), chunk_size=8, n_stabilizers=3, n_sinks=2)
  sizes = set()
  for n in (40, 120):
    pre = prefill_with_eviction(model1, [(PROMPTS[1] * 3)[:n]], config=config)
    assert pre.stats.capacity == 10 + 8 and pre.caches[0].k.shape == (1, 2, 18, 16)
    for h, b in enumerate((6, 10)):
      kept = live(pre.caches[0], 0, h).tolist()
      assert len(kept) == b
      assert kept[:2] == [0, 1] and kept[-3:] == [n - 3, n - 2, n - 1]  # sinks, stabilizers
    sizes.add(pre.stats.peak_kv_bytes)
  assert len(sizes) == 1


def test_bad_configs_raise_naming_the_field(model2):
  with pytest.raises(ValueError, match="EvictionConfig.scorer"):
    EvictionConfig(scorer="lru", budget=8)
  with pytest.raises(ValueError, match="exactly one of budget and compression"):
    EvictionConfig(budget=8, compression=4)
  with pytest.raises(ValueError, match="exactly one of budget and compression"):
    EvictionConfig()
  with pytest.raises(ValueError, match="EvictionConfig.budget"):
    EvictionConfig(budget=[4, 0])
  with pytest.raises(ValueError, match="EvictionConfig.compression"):
    EvictionConfig(compression=0.5)
  with pytest.raises(ValueError, match="EvictionConfig.chunk_size"):
    EvictionConfig(budget=8, chunk_size=0)
  with pytest.raises(ValueError, match="EvictionConfig.position_mode"):
    EvictionConfig(budget=8, position_mode="shifted")
  with pytest.raises(ValueError, match="EvictionConfig.decode_mode"):
    EvictionConfig(budget=8, decode_mode="drop")
  with pytest.raises(ValueError, match="EvictionConfig.snapkv_kernel"):
    EvictionConfig(budget=8, snapkv_kernel=4)
  with pytest.raises(ValueError, match="n_stabilizers .* n_sinks"):
    EvictionConfig(budget=8, n_stabilizers=6, n_sinks=4)
  with pytest.raises(ValueError, match="n_stabilizers .* n_sinks"):  # budget from compression
    prefill_with_eviction(model2, PROMPTS, config=EvictionConfig(compression=8, n_stabilizers=7))
  with pytest.raises(ValueError, match="EvictionConfig.budget has shape"):
    prefill_with_eviction(model2, PROMPTS, config=EvictionConfig(budget=(4, 4, 4)))
  with pytest.raises(ValueError, match="heads"):
    prefill_with_eviction(model2, PROMPTS, config=EvictionConfig(scorer="locret", budget=8))
  with pytest.raises(ValueError, match="max_seq_len"):
    generate_with_eviction(model2, [[1] * 250], config=EvictionConfig(budget=8),
                           max_new_tokens=10)


def test_eviction_sweep_end_to_end(tmp_path, model1):
  """The sweep binary on a tiny checkpoint: full cache + a scorer at two compressions;
  locret without --retaining_heads is skipped with a note."""
  from sparsejax.data.tokenizers import ByteTokenizer
  from sparsejax.train.checkpoint import Checkpointer

  cfg = small_config(vocab_size=259, num_layers=1, max_seq_len=512)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  workdir = tmp_path / "run"
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  ckpt.save(0, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            meta={"step": 0, "model": cfg.to_dict()}, wait=True)
  ckpt.close()
  ByteTokenizer().save(str(workdir / "tokenizer"))
  out = str(tmp_path / "sweep")
  args = ["experiments.eviction_sweep", f"--workdir={workdir}", "--tasks=passkey", "--lengths=256",
          "--depths=0.5", "--samples=1", "--batch_size=1", "--max_new_tokens=4", "--ratios=2,4",
          "--eviction_chunk_size=64", f"--out={out}"]
  stdout = run_module(*args, "--scorers=locret,streaming")
  data = json.load(open(out + ".json"))
  assert 0.0 <= data["full_cache_score"] <= 1.0
  assert set(data["methods"]) == {"streaming"}
  assert "locret" in data["skipped"] and "--retaining_heads" in data["skipped"]["locret"]
  for by_ratio in data["methods"].values():
    assert set(by_ratio) == {"2", "4"}
    assert 0.0 <= by_ratio["2"]["score"] <= 1.0
    assert by_ratio["4"]["peak_kv_bytes"] < by_ratio["2"]["peak_kv_bytes"]
    assert by_ratio["2"]["peak_kv_bytes"] < data["full_cache"]["peak_kv_bytes"]
  assert data["settings"]["chunk_size"] == 64
  assert len(data["full_cache"]["samples"]) == 1 and "score" in data["full_cache"]["samples"][0]
  report = open(out + ".md").read()
  assert "| streaming |" in report and "locret" in stdout
  assert "| streaming - full cache | 2x |" in report       # the paired intervals
  with open(out + ".png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(out + ".png") > 1000
  # A rerun with the same settings keeps every entry (a sweep can be split over commands).
  stdout = run_module(*args, "--scorers=streaming")
  assert stdout.count("kept from the previous run") == 2
  assert json.load(open(out + ".json"))["methods"] == data["methods"]
