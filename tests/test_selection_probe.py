"""The InfLLM-V2 selection probe (sparsejax.eval.selection): needle location, ranks that agree with
select_blocks, a planted needle found by both rankings, and the binary end to end (tiny sizes)."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ModelConfig
from sparsejax.data import ByteTokenizer
from sparsejax.eval import make_sample
from sparsejax.eval.selection import needle_prompt, probe_layer, probe_model, summarize
from sparsejax.model import DecoderLM
from sparsejax.ops.infllmv2 import InfLLMv2Config
from sparsejax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = InfLLMv2Config(block_size=16, compress_window=16, compress_stride=8, lse_window=32,
                     lse_stride=16, init_blocks=1, local_blocks=2, topk=5, dense_len=0)


def test_needle_prompt_finds_both_statements_of_the_passkey():
  tok = ByteTokenizer()
  sample = make_sample("passkey", tok, 400, depth=0.5, seed=3)
  p = needle_prompt(tok, sample.prompt, sample.answers)
  key = sample.answers[0]
  text = bytes(p.tokens[1:].astype(np.uint8)).decode()
  # Every located position holds a digit of the key; the key is stated twice in the needle.
  assert all(text[i - 1] in key for i in p.needle_positions)
  assert len(p.needle_positions) == 2 * len(key)
  # Queries: the last prompt token, then the answer " 12345" teacher-forced but for its last byte.
  assert p.query_positions[0] == 1 + len(tok.encode(sample.prompt)) - 1
  assert len(p.query_positions) == len(" " + key)
  assert p.tokens.shape[0] == p.query_positions[-1] + 1
  with pytest.raises(ValueError, match="none of the answers"):
    needle_prompt(tok, "no digits here", ("12345",))


def _random_qk(t, seed, heads=4, kv_heads=2, d=8):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(t, heads, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(t, kv_heads, d)), jnp.float32))


@pytest.mark.parametrize("t", [160, 203])
def test_selection_rank_agrees_with_select_blocks(t):
  q, k = _random_qk(t, seed=t)
  queries = np.array([t - 3, t - 2, t - 1])
  # One needle block per case, from the first (forced init) to the query's own (forced local).
  for needle in range(0, (t - 3) // CFG.block_size + 1):
    r = probe_layer(q, k, np.array([needle]), queries, CFG)
    for i, p in enumerate(queries):
      q_block = p // CFG.block_size
      forced_count = CFG.init_blocks + min(CFG.local_blocks, q_block + 1 - CFG.init_blocks)
      free_slots = CFG.topk - forced_count
      for h in range(k.shape[1]):
        if r["forced"][i, h]:
          assert r["selected"][i, h] and r["selection_rank"][i, h] == 0
        else:
          assert r["selected"][i, h] == (r["selection_rank"][i, h] < free_slots)
        assert 0.0 <= r["attention_mass"][i, h] <= 1.0 + 1e-6
  # The init block and the query's own blocks are forced; a middle block is not.
  assert probe_layer(q, k, np.array([0]), queries, CFG)["forced"].all()
  assert not probe_layer(q, k, np.array([3]), queries, CFG)["forced"].any()


def test_a_planted_needle_ranks_first_by_both_scores():
  t, d = 256, 8
  q, k = _random_qk(t, seed=0, d=d)
  q, k = 0.1 * q, 0.1 * k
  direction = np.zeros(d, np.float32)
  direction[0] = 1.0
  needle_block = 5
  k = k.at[needle_block * 16:(needle_block + 1) * 16].add(jnp.asarray(3.0 * direction))
  q = q.at[t - 1].set(jnp.asarray(3.0 * direction))
  r = probe_layer(q, k, np.array([needle_block]), np.array([t - 1]), CFG)
  assert r["selected"].all() and not r["forced"].any()
  assert (r["selection_rank"] == 0).all() and (r["attention_rank"] == 0).all()
  assert (r["attention_mass"] > 0.5).all()
  # Rows of one summary line per layer.
  (row,) = summarize([[r]], free_slots=2)
  assert row["selected"] == 1.0 and row["oracle_selected_unforced"] == 1.0
  assert row["median_selection_rank"] == 0.0 and row["cases"] == 2


def test_probe_model_runs_every_layer():
  config = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, ffn_hidden=64, max_seq_len=512, dtype="float32")
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  tok = ByteTokenizer()
  sample = make_sample("passkey", tok, 300, depth=0.25, seed=1)
  layers = probe_model(model, needle_prompt(tok, sample.prompt, sample.answers), CFG)
  assert len(layers) == 2
  n_queries = len(" " + sample.answers[0])
  for layer in layers:
    assert layer["selected"].shape == (n_queries, 2)
    assert layer["selection_rank"].dtype.kind == "i"


def test_selection_probe_binary(tmp_path):
  """An InfLLM-V2 checkpoint (random weights) through the binary: its own selection settings,
  the JSON and the markdown."""
  sparse = {"block_size": 16, "compress_window": 16, "compress_stride": 8, "init_blocks": 1,
            "local_blocks": 2, "topk": 5, "dense_len": 0}
  config = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, ffn_hidden=64, max_seq_len=512, dtype="float32",
                       attention="infllmv2", attention_options=tuple(sorted(sparse.items())))
  workdir = tmp_path / "run"
  state = nnx.state(DecoderLM(config, rngs=nnx.Rngs(0)), nnx.Param)
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  ckpt.save(3, params=nnx.to_pure_dict(state), meta={"step": 3, "model": config.to_dict()},
            wait=True)
  ckpt.close()
  ByteTokenizer().save(str(workdir / "tokenizer"))
  out = tmp_path / "probe"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.selection_probe", f"--workdir={workdir}",
       "--lengths=200", "--depths=0.3,0.6", "--samples=1", "--tasks=passkey", f"--out={out}"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "probe.json").read_text())
  assert report["free_slots"] == 2 and report["prompts"] == 2 and report["step"] == 3
  assert report["sparse"]["block_size"] == 16
  assert len(report["layers"]) == 2
  assert "| layer |" in (tmp_path / "probe.md").read_text() and "| layer |" in result.stdout


def test_padding_after_the_queries_changes_nothing_and_gaps_are_refused():
  q, k = _random_qk(200, seed=5)
  queries = np.arange(150, 156)
  a = probe_layer(q[:156], k[:156], np.array([4]), queries, CFG)
  b = probe_layer(q, k, np.array([4]), queries, CFG)
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=1e-5)
  with pytest.raises(ValueError, match="consecutive"):
    probe_layer(q, k, np.array([4]), np.array([150, 152]), CFG)
