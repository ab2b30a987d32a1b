"""BlockFFN and its baselines: routers, dense expert compute, losses, adaptive coefficients,
sparsity metrics, training through the Trainer (exact resume included) and the ablation binary."""
import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.blockffn_ablation import get_config
from experiments import ppl_sparsity
from sparsejax.config import ModelConfig
from sparsejax.ops.sparsity import (chunk_level_sparsity, reuse_ratio, static_experts,
                                    token_level_sparsity)
from sparsejax.layers import moe
from sparsejax.model import DecoderLM, matmul_flops_per_token
from sparsejax.train.coefficients import (Coefficients, TargetController, WindowRatioController,
                                          weighted_aux_loss)
from sparsejax.train.trainer import Trainer
from tests.test_experiments import run


def model_config(ffn="blockffn", **options):
  return ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=8, ffn_hidden=32, max_seq_len=64, dtype="float32", ffn=ffn,
                     ffn_options=tuple(sorted(options.items())))


KINDS = {"blockffn": moe.BlockFFN, "topk_moe": moe.TopKMoE, "remoe": moe.ReMoE}


# Jitted once each: on a CPU one compiled function is several times cheaper than op-by-op.
al_loss = jax.jit(moe.activation_locality_loss, static_argnums=2)
al_grad = jax.jit(jax.grad(moe.activation_locality_loss), static_argnums=2)
cs_loss = jax.jit(moe.chunk_sparsification_loss, static_argnums=2)
cs_grad = jax.jit(jax.grad(moe.chunk_sparsification_loss), static_argnums=2)
tls = jax.jit(token_level_sparsity)
cls = jax.jit(chunk_level_sparsity, static_argnums=2)
reuse = jax.jit(reuse_ratio)


def layer(ffn="blockffn", seed=0, **options):
  options = {"num_experts": 6, "expert_width": 4} | options
  config = model_config(ffn, **options)
  return nnx.jit(lambda: KINDS[ffn](config, rngs=nnx.Rngs(seed)))()


def inputs(batch=2, seq=10, d=16, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, seq, d)), jnp.float32)


def silu(v):
  return v / (1 + np.exp(-v))


# ---- the layers ----------------------------------------------------------------------------------
def test_router_is_relu_rmsnorm_and_inactive_experts_contribute_nothing():
  ffn = layer()
  ffn.router_norm.scale[...] = np.linspace(0.5, 1.5, 6, dtype=np.float32)
  x = inputs()
  forward = nnx.jit(lambda m, v: (m.route(v), m(v)[0]))  # one compile, not one per op
  (a0, a1, a), y = forward(ffn, x)
  want_a0 = np.einsum("btd,de->bte", np.asarray(x), np.asarray(ffn.w_router[...]))
  np.testing.assert_allclose(a0, want_a0, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(a1, np.maximum(a0, 0))
  rms = np.sqrt(np.mean(np.square(a1), axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(a, a1 / rms * np.linspace(0.5, 1.5, 6), rtol=1e-5, atol=1e-6)
  assert np.all((np.asarray(a) != 0) == (np.asarray(a1) > 0))
  assert 0 < np.mean(np.asarray(a1) > 0) < 1  # some experts on, some off

  # Scrambling the weights of the experts that token (0, 3) does not use leaves its output alone.
  off = np.flatnonzero(np.asarray(a1[0, 3]) == 0)
  assert off.size
  rng = np.random.default_rng(9)
  w_up, w_down = np.array(ffn.w_up[...]), np.array(ffn.w_down[...])
  w_up[:, off] += rng.normal(size=w_up[:, off].shape)
  w_down[off] += rng.normal(size=w_down[off].shape)
  ffn.w_up[...], ffn.w_down[...] = w_up, w_down
  _, y2 = forward(ffn, x)
  np.testing.assert_array_equal(y2[0, 3], y[0, 3])
  assert not np.allclose(y2, y)  # the scrambled experts do serve other tokens


@pytest.mark.parametrize("kind", ["blockffn", "topk_moe", "remoe"])
def test_dense_compute_equals_a_per_token_loop_over_active_experts(kind):
  ffn = layer(kind, top_k=2) if kind == "topk_moe" else layer(kind)
  x = inputs(batch=1, seq=5)
  y, _ = nnx.jit(lambda m, v: m(v))(ffn, x)
  logits = np.asarray(x) @ np.asarray(ffn.w_router[...])
  if kind == "blockffn":
    a1 = np.maximum(logits, 0)
    scale = np.asarray(ffn.router_norm.scale[...])
    gates = a1 / np.sqrt(np.mean(a1 ** 2, axis=-1, keepdims=True) + 1e-6) * scale
  elif kind == "remoe":
    gates = np.maximum(logits, 0)
  else:
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    gates = np.zeros_like(probs)
    for t in range(5):
      top = np.argsort(-probs[0, t])[:2]
      gates[0, t, top] = probs[0, t, top] / probs[0, t, top].sum()
  w_up, w_down, xs = np.asarray(ffn.w_up[...]), np.asarray(ffn.w_down[...]), np.asarray(x)
  for t in range(5):
    want = np.zeros(16)
    for i in np.flatnonzero(gates[0, t]):
      want += gates[0, t, i] * silu(xs[0, t] @ w_up[:, i]) @ w_down[i]
    np.testing.assert_allclose(y[0, t], want, rtol=1e-4, atol=1e-6)
  # The neuron view (PPL-p% sparsity) is the same FFN: E*w gated units times the stacked w_down.
  hidden, w_out = nnx.jit(lambda m, v: m.hidden_units(v))(ffn, x)
  assert hidden.shape == (1, 5, 6 * 4) and w_out.shape == (6 * 4, 16)
  np.testing.assert_allclose(np.asarray(hidden) @ np.asarray(w_out), y, rtol=1e-4, atol=1e-6)


def test_activation_locality_pairs_only_tokens_of_one_document():
  a0 = jnp.asarray(np.random.default_rng(3).normal(size=(1, 6, 3)) * 0.05, jnp.float32)
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  got = al_loss(a0, seg, 100.0)
  a = np.asarray(a0, np.float64)[0] * 100
  terms = []
  for t in (1, 2, 4):  # pairs (0,1), (1,2), (3,4): not across the boundary, not into padding
    p, q = 1 / (1 + np.exp(-a[t - 1])), 1 / (1 + np.exp(-a[t]))
    terms.append(-(q * np.log(p) + (1 - q) * np.log(1 - p)))
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
  np.testing.assert_array_equal(al_grad(a0, seg, 100.0)[0, 5], 0)  # padding takes no part
  assert float(al_loss(a0, jnp.array([[1, 2, 3, 4, 5, 0]]), 100.0)) == 0.0


def test_chunk_sparsification_hand_computed():
  # E = 2, chunk_len = 2, segments [1 1 | 1 2 | 0]: groups {0, 1}, {2}, {3}; padding excluded.
  a1 = jnp.array([[[1.0, 0.0], [1.0, 3.0], [2.0, 2.0], [0.0, 0.0], [5.0, 1.0]]])
  seg = jnp.array([[1, 1, 1, 2, 0]])
  p = np.array([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5], [0.0, 0.0]])
  groups = [[0, 1], [2], [3]]
  want = np.mean([np.mean(1 - np.prod(1 - p[g], axis=0)) for g in groups])
  got = cs_loss(a1, seg, 2)
  np.testing.assert_allclose(got, want, atol=2e-6)
  # One chunk of 4 real tokens of one document: a single group.
  got4 = cs_loss(a1, jnp.array([[1, 1, 1, 1, 0]]), 4)
  np.testing.assert_allclose(got4, np.mean(1 - np.prod(1 - p, axis=0)), atol=2e-6)
  assert np.all(np.isfinite(cs_grad(a1, seg, 2)))  # also where one expert takes a token (p=1)


def test_topk_and_remoe_pieces():
  logits = np.log(np.array([[[0.1, 0.2, 0.3, 0.4]]], np.float32))
  top_k = jax.jit(moe.top_k_gates, static_argnums=(1, 2))
  gates, probs = top_k(logits, 2, True)
  np.testing.assert_allclose(gates[0, 0], [0, 0, 3 / 7, 4 / 7], rtol=1e-6)
  raw, _ = top_k(logits, 2, False)
  np.testing.assert_allclose(raw[0, 0], [0, 0, 0.3, 0.4], rtol=1e-6)
  # A uniform router with uniform load has balance loss 1.
  uniform = np.full((1, 4, 4), 0.25, np.float32)
  chosen = np.eye(4, dtype=bool)[None]
  np.testing.assert_allclose(jax.jit(moe.switch_balance_loss)(uniform, chosen, None), 1.0,
                             rtol=1e-6)
  # ReMoE's L1: every expert active on half the tokens at target 0.5 is the plain mean L1 norm.
  r = np.array([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]]], np.float32)
  np.testing.assert_allclose(jax.jit(moe.remoe_l1_loss, static_argnums=2)(r, None, 0.5), 2.5,
                             rtol=1e-6)


def test_bad_options_name_the_option():
  cases = [({"num_expert": 4}, "unknown ffn_options \\['num_expert'\\]"),
           ({"num_experts": 0}, "ffn_options\\['num_experts'\\] must be a positive int"),
           ({"alpha": -1.0}, "ffn_options\\['alpha'\\] must be a positive number"),
           ({"use_al": "yes"}, "ffn_options\\['use_al'\\] must be True or False"),
           ({"cs_schedule": "cosine"}, "ffn_options\\['cs_schedule'\\]"),
           ({"cs_hold": 10, "cs_window": 20}, "ffn_options\\['cs_hold'\\]=10 must be >="),
           ({"num_experts": 5}, "ffn_options\\['expert_width'\\] is unset")]
  for options, match in cases:
    with pytest.raises(ValueError, match=match):
      moe.BlockFFN(model_config("blockffn", **options), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ffn_options\\['top_k'\\]=9 exceeds num_experts=8"):
    moe.TopKMoE.options(model_config("topk_moe", num_experts=8, top_k=9))
  with pytest.raises(ValueError, match="ffn_options\\['target_sparsity'\\] must be"):
    moe.ReMoE.options(model_config("remoe", num_experts=8, target_sparsity=1.5))
  with pytest.raises(ValueError, match="ffn='relu_ffn': unknown ffn_options \\['top_k'\\]"):
    moe.ReLUFFN.options(model_config("relu_ffn", top_k=2))


def test_flops_count_the_dense_expert_compute():
  c = model_config("blockffn", num_experts=8, expert_width=4)
  assert moe.BlockFFN.matmul_params(c) == 16 * 8 * (1 + 2 * 4)
  dense = model_config("swiglu")
  diff = matmul_flops_per_token(c, 32) - matmul_flops_per_token(dense, 32)
  assert diff == 6 * (16 * 8 * 9 - 3 * 16 * 32)


# ---- sparsity metrics ----------------------------------------------------------------------------
def test_sparsity_metrics_on_hand_made_masks():
  # 2 experts, 6 tokens: documents [0, 1, 2] and [3, 4], padding at 5.
  active = jnp.array([[[1, 0], [1, 0], [0, 1], [1, 0], [0, 0], [1, 1]]], bool)
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  np.testing.assert_allclose(tls(active, seg), (0.5 * 4 + 1.0) / 5)
  # L = 2 windows inside a document: (0,1) -> expert 1 idle; (1,2) -> none; (3,4) -> expert 1.
  # The window (2,3) crosses the boundary and (4,5) touches padding: skipped.
  np.testing.assert_allclose(cls(active, seg, 2), (0.5 + 0 + 0.5) / 3)
  np.testing.assert_allclose(cls(active, seg, 3), 0.0)  # only (0,1,2)
  assert np.isnan(cls(active, seg, 4))  # no document has 4 tokens
  assert np.isnan(cls(active, seg, 7))
  np.testing.assert_allclose(cls(active, seg, 1), tls(active, seg))
  # Reuse over pairs (0,1), (1,2), (3,4): shared 1 + 0 + 0 of 1 + 1 + 0 active.
  np.testing.assert_allclose(reuse(active, seg), 0.5)
  # Without segment ids the row is one document: (2,3) and (4,5) count too.
  np.testing.assert_allclose(cls(active, None, 2), (0.5 + 0 + 0 + 0.5 + 0) / 5)
  with pytest.raises(ValueError, match="segment_ids must have shape \\(1, 6\\)"):
    token_level_sparsity(active, seg[:, :5])
  with pytest.raises(ValueError, match="active must be a bool array"):
    reuse_ratio(active.astype(jnp.int32), seg)
  with pytest.raises(ValueError, match="chunk_len must be a positive int"):
    chunk_level_sparsity(active, seg, 0)


def test_static_experts_counts_dead_and_always_on_experts_over_real_tokens():
  # 4 experts over 3 real tokens and one padding token: expert 0 always fires, expert 1 never,
  # expert 2 for one token, expert 3 only on the padding token (so never, among real tokens).
  active = jnp.array([[[1, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]], bool)
  seg = jnp.array([[1, 1, 2, 0]])
  never, always = static_experts(active, seg)
  np.testing.assert_allclose([never, always], [0.5, 0.25])
  never, always = static_experts(active, None)              # the padding token counts now
  np.testing.assert_allclose([never, always], [0.25, 0.0])
  assert all(np.isnan(v) for v in static_experts(active, jnp.zeros((1, 4), jnp.int32)))
  with pytest.raises(ValueError, match="static_experts: segment_ids must have shape"):
    static_experts(active, seg[:, :3])


# ---- coefficients --------------------------------------------------------------------------------
def test_lambda_cs_controller_follows_the_rule_and_round_trips():
  c = WindowRatioController(1.0, metric="scaled_loss/cs", hold=2, window=2)
  xs = [10, 10, 5, 5, 5.05, 5.05, 20, 20, 80, 80]
  values = []
  for step, x in enumerate(xs, start=1):
    c.observe(step, x)
    values.append(c.value)
    if step == 5:
      saved = json.loads(json.dumps(c.state_dict()))
  assert values[:3] == [1.0, 1.0, 1.0]           # hold, then no window end at step 3
  assert values[3] == pytest.approx(0.5)          # gamma 0.5 <= 1: follow it down
  assert values[4] == values[3]
  assert values[5] == pytest.approx(0.5 * 1.025)  # gamma 1.01: at least 1.025
  assert values[7] == pytest.approx(0.5 * 1.025 * 20 / 5.05)  # gamma > 1.025: follow it up
  assert values[9] == 4.0                          # capped at 4 x the initial value
  again = WindowRatioController(1.0, metric="scaled_loss/cs", hold=2, window=2)
  again.load_state_dict(saved)
  for step, x in enumerate(xs[5:], start=6):
    again.observe(step, x)
  assert again.value == c.value
  with pytest.raises(ValueError, match="consecutive"):
    again.observe(12, 1.0)
  with pytest.raises(ValueError, match="hold=1 must be >= window=2"):
    WindowRatioController(1.0, metric="m", hold=1, window=2)


def test_coefficient_timing_lag_and_pending_state():
  # ReMoE's rule with lag 1: the sparsity of step s changes the value of step s + 2.
  coefs = Coefficients({"l1": TargetController(1.0, metric="metric/tls", target=0.5,
                                               multiplier=2.0, lag=1)})
  used, sparsity = [], [0.2, 0.9, 0.9, 0.2, 0.2]
  for step, s in enumerate(sparsity, start=1):
    used.append(float(coefs.values()["l1"]))
    coefs.record(step, {"metric/tls": jnp.float32(s)})
    if step == 3:
      state = json.loads(json.dumps(coefs.state_dict()))
  assert used == [1.0, 1.0, 2.0, 1.0, 0.5]
  assert state["l1"]["pending"] == [[3, pytest.approx(0.9)]]
  resumed = Coefficients({"l1": TargetController(1.0, metric="metric/tls", target=0.5,
                                                 multiplier=2.0, lag=1)})
  resumed.load_state_dict(state)
  after = []
  for step, s in enumerate(sparsity[3:], start=4):
    after.append(float(resumed.values()["l1"]))
    resumed.record(step, {"metric/tls": jnp.float32(s)})
  assert after == used[3:]
  with pytest.raises(ValueError, match="does not report"):
    coefs.record(6, {"loss": 1.0})
  with pytest.raises(ValueError, match="no coefficient 'cs'"):
    weighted_aux_loss({"scaled_loss/cs": jnp.ones(())}, {"l1": 1.0})
  np.testing.assert_allclose(
      weighted_aux_loss({"loss/al": 0.5, "scaled_loss/l1": 2.0, "metric/tls": 9.0}, {"l1": 0.25}),
      1.0)


# ---- through the Trainer -------------------------------------------------------------------------
def trainer_config(workdir, method, **train):
  c = get_config(method + ",tiny")
  c.workdir = str(workdir)
  c.model.num_layers = 1
  c.data.seq_len = 32
  c.train.update(dict(steps=2, checkpoint_every=0) | train)
  return c


def read_log(workdir):
  with open(os.path.join(workdir, "logs", "train_metrics.csv")) as f:
    return list(csv.DictReader(f))


def test_blockffn_exact_resume_with_its_coefficient(tmp_path):
  # hold = window = 1: lambda_cs changes after every step from step 2 on, so the state saved at
  # step 2 decides the resumed steps. The resumed trainer restores the step-2 checkpoint of the
  # straight run (a fresh Trainer, as a restarted process would build it).
  c = trainer_config(tmp_path, "blockffn", steps=4, checkpoint_every=2, eval_batches=1)
  c.model.ffn_options.update(cs_hold=1, cs_window=1)
  straight = Trainer(c, progress=False)
  full = straight.train()
  straight.close()
  resumed = Trainer(c, progress=False)
  resumed.restore(2)
  assert resumed.step == 2
  rest = resumed.train()
  ev = resumed.evaluate()
  resumed.close()
  keys = ("loss", "loss/al", "scaled_loss/cs", "coef/cs", "metric/tls", "metric/cls8")
  assert [[h[k] for k in keys] for h in full["history"][2:]] == [
      [h[k] for k in keys] for h in rest["history"]]
  coefs = [h["coef/cs"] for h in full["history"]]
  assert coefs[:2] == pytest.approx([0.05, 0.05]) and coefs[2] != coefs[1]  # the rule acted
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, straight.params),
               jax.tree.map(np.asarray, resumed.params))
  assert straight.coefficients.state_dict() == resumed.coefficients.state_dict()
  assert {"loss", "bits_per_byte", "metric/tls", "metric/cls8", "metric/cls64",
          "metric/reuse", "metric/never_active", "metric/always_active"} <= set(ev)
  assert 0 <= ev["metric/tls"] <= 1


def test_ablation_binary_trains_each_kind_and_writes_results(tmp_path):
  # The binary trains through the Trainer: this covers topk_moe, remoe and relu_ffn training
  # (blockffn above, swiglu in test_train) and their logged aux losses and coefficients.
  out, runs = str(tmp_path / "abl"), tmp_path / "runs"
  methods = ["topk_moe", "remoe", "relu_dense"]
  text = run("experiments.blockffn_ablation", "--size=tiny", f"--methods={','.join(methods)}",
             f"--workdir={runs}", f"--out={out}", "--steps=2")
  assert "| remoe |" in text
  with open(out + ".json") as f:
    results = json.load(f)["methods"]
  assert list(results) == methods
  remoe = results["remoe"]
  assert math.isfinite(remoe["ppl"]) and 0 <= remoe["tls"] <= 1 and "cls8" in remoe
  assert set(remoe["cls"]) == {"2", "4", "8", "16", "32", "64"}
  assert 0 <= remoe["never_active"] <= 1 and 0 <= remoe["always_active"] <= 1
  assert [step for step, _ in remoe["train_loss"]] == [1, 2]   # tiny logs every step
  assert results["relu_dense"]["tls"] is None and results["relu_dense"]["neuron_sparsity"] > 0
  assert os.path.getsize(out + ".png") > 0 and os.path.exists(out + ".md")
  logged = {"topk_moe": ["loss/balance", "metric/tls"],
            "remoe": ["scaled_loss/l1", "coef/l1", "metric/cls8"],
            "relu_dense": ["metric/neuron_sparsity"]}
  for method, names in logged.items():
    rows = read_log(runs / method)
    assert len(rows) == 2 and all(math.isfinite(float(r["loss"])) for r in rows)
    for name in names:
      assert all(math.isfinite(float(row[name])) for row in rows), (method, name)
  # Sparsity under the target at init: ReMoE's coefficient rises, its reading one step late.
  assert [float(r["coef/l1"]) for r in read_log(runs / "remoe")] == pytest.approx([1e-5, 1e-5])
  # Runs split over calls merge into one table, in the paper's order, measurements untouched.
  part = dict(json.load(open(out + ".json")), methods={"dense": dict(results["remoe"])})
  with open(tmp_path / "part.json", "w") as f:
    json.dump(part, f)
  run("experiments.blockffn_ablation", "--size=tiny", f"--merge={out}.json,{tmp_path}/part.json",
      f"--out={tmp_path}/merged")
  with open(tmp_path / "merged.json") as f:
    merged = json.load(f)
  assert list(merged["methods"]) == ["dense", "relu_dense", "topk_moe", "remoe"]
  assert merged["methods"]["remoe"] == results["remoe"] and merged["device"] == part["device"]


def test_ppl_sparsity_search_on_a_swiglu_model():
  # Random weights at a large init scale so that the FFNs matter to the loss.
  config = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                       head_dim=8, ffn_hidden=32, max_seq_len=64, dtype="float32",
                       ffn="swiglu", init_std=0.3)
  model = nnx.jit(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (2, 2, 33)).astype(np.int32)
  batches = [{"inputs": t[:, :-1], "targets": t[:, 1:], "segment_ids": np.ones((2, 32), np.int32),
              "positions": np.tile(np.arange(32, dtype=np.int32), (2, 1)),
              "loss_mask": np.ones((2, 32), np.int32)} for t in tokens]
  result = ppl_sparsity.ppl_sparsity(model, batches, jnp.ones((64,), jnp.int32), p=1.0,
                                     calibration_tokens=48, c_iters=6)
  assert result["target_ppl"] == pytest.approx(1.01 * result["base_ppl"])
  assert result["ppl"] <= result["target_ppl"]
  assert 0 < result["cett"] < 1 and 0 < result["sparsity"] < 1
  assert result["exact_zero_fraction"] == 0.0  # SiLU never gives exact zeros
  assert len(result["eps"]) == 2 and len(result["trace"]) == 2 + 6
  # Each layer's eps hits the shared CETT from below, and the next eps up would overshoot.
  hidden = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  w_out = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  eps = ppl_sparsity.eps_for_cett(hidden, w_out, 0.3)
  assert float(ppl_sparsity.cett(hidden, w_out, jnp.float32(eps))) <= 0.3
  assert float(ppl_sparsity.cett(hidden, w_out, jnp.float32(eps * 1.01))) > 0.29
  with pytest.raises(ValueError, match="p must be > 0"):
    ppl_sparsity.ppl_sparsity(model, batches, jnp.ones((64,), jnp.int32), p=0.0)
