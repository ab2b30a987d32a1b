"""Issue 4's ablation pipeline: the trainer's init_from, the configs, and the binary end to end at
--scale=cpu_tiny (tiny model, short lengths, a dense_len below them so the sparse path runs)."""
import csv
import json
import os

import jax
import numpy as np
import pytest

from configs import longctx_ablation as ablation
from configs.base import base_config
from sparsejax.train.trainer import Trainer
from tests.test_experiments import run as run_module


def _tiny(workdir, **model):
  c = base_config()
  c.workdir = str(workdir)
  c.model.update(dict(vocab_size=259, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, ffn_hidden=64, max_seq_len=64, dtype="float32") | model)
  c.data.seq_len = 32
  c.train.update(steps=1, batch_size=2, warmup_steps=0, eval_every=0, checkpoint_every=1)
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_init_from_loads_the_other_runs_params_exactly(tmp_path):
  src = Trainer(_tiny(tmp_path / "src"), progress=False)
  # Saved weights that no init would produce, so equality proves they were loaded.
  src.params = jax.tree.map(lambda x: x + 0.5, src.params)
  saved = _leaves(src.params)
  src.save(wait=True)
  src.close()

  # Another attention kind, max_seq_len, sequence length and seed: no parameter changes.
  cfg = _tiny(tmp_path / "dst", attention="infllmv2",
              attention_options=dict(block_size=16, init_blocks=1, local_blocks=1, topk=4,
                                     dense_len=32))
  cfg.model.max_seq_len = 256
  cfg.data.seq_len = 128
  cfg.train.update(seed=7, init_from=str(tmp_path / "src"))
  dst = Trainer(cfg, progress=False)
  try:
    assert dst.step == 0 and dst.data_config.seq_len == 128
    for got, want in zip(_leaves(dst.params), saved, strict=True):
      np.testing.assert_array_equal(got, want)
    moments = [x for x in _leaves(dst.opt_state) if x.ndim > 0]
    assert moments and all(not x.any() for x in moments)  # a fresh optimizer state
    assert os.path.exists(tmp_path / "dst" / "tokenizer" / "tokenizer.json")
    dst.params = jax.tree.map(lambda x: x - 1.0, dst.params)
    mine = _leaves(dst.params)
    dst.save(wait=True)
  finally:
    dst.close()
  # Once the run has its own checkpoint, a restart resumes it and ignores init_from.
  again = Trainer(cfg, progress=False)
  try:
    for got, want in zip(_leaves(again.params), mine, strict=True):
      np.testing.assert_array_equal(got, want)
  finally:
    again.close()


def test_init_from_errors_name_the_setting(tmp_path):
  src = Trainer(_tiny(tmp_path / "src"), progress=False)
  src.save(wait=True)
  src.close()
  wider = _tiny(tmp_path / "wider", d_model=48)
  wider.train.init_from = str(tmp_path / "src")
  with pytest.raises(ValueError, match=r"train.init_from=.*parameter .* has shape"):
    Trainer(wider, progress=False)
  nowhere = _tiny(tmp_path / "nowhere")
  nowhere.train.init_from = str(tmp_path / "missing")
  with pytest.raises(ValueError, match=r"train.init_from=.*missing.*checkpoints"):
    Trainer(nowhere, progress=False)


def test_configs_derive_matched_continuations():
  pre = ablation.get_config("gpu")
  assert pre.model.attention == "dense" and pre.data.seq_len == 4096
  conts = {m: ablation.get_config(f"gpu,{m}") for m in ablation.METHODS}
  for m, c in conts.items():
    assert c.workdir.endswith(m) and c.train.init_from == pre.workdir
    for key in ("steps", "batch_size", "lr", "seed"):
      assert c.train[key] == conts["dense"].train[key], (m, key)
    assert c.data.seq_len == 16384 and c.data.seed == pre.data.seed
    # Only attention kind/options and max_seq_len differ from the pretrained model.
    same = {k: v for k, v in c.model.items()
            if k not in ("attention", "attention_options", "max_seq_len")}
    assert same == {k: v for k, v in pre.model.items() if k in same}
  sparse = dict(conts["infllmv2"].model.attention_options)
  visible = sparse["topk"] * sparse["block_size"]
  assert visible / 16384 < 0.15
  assert conts["sliding_window"].model.attention_options["window"] == visible
  nosa = dict(conts["nosa"].model.attention_options)
  assert nosa == sparse | {"query_topk": 17, "dense_len": 0}   # the same 32 blocks, split
  assert conts["nosa"].train.new_params == "evict_proj,evict_scale"
  assert sparse["dense_len"] <= min(pre.ablation.eval.lengths)
  pre.ablation.sliding_kind = "local_blocks"
  local = ablation.continuation_config(pre, "sliding_window")
  assert local.model.attention == "infllmv2"
  assert local.model.attention_options.local_blocks == sparse["topk"]
  assert local.model.attention_options.init_blocks == 0
  with pytest.raises(ValueError, match="scale"):
    ablation.get_config("tpu")
  with pytest.raises(ValueError, match="phase"):
    ablation.get_config("gpu,nsa")
  with pytest.raises(ValueError, match="method"):
    ablation.continuation_config(pre, "nsa")
  pre.ablation.continuation.seq_len = 1024
  with pytest.raises(ValueError, match="dense_len"):
    ablation.continuation_config(pre, "infllmv2")


def test_binary_cpu_tiny_end_to_end(tmp_path, monkeypatch):
  # Unoptimised XLA CPU code compiles several times faster; the run is compile-bound.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                     "--xla_llvm_disable_expensive_passes=true")
  out = tmp_path / "out"
  stdout = run_module("experiments.longctx_ablation", "--scale=cpu_tiny",
                      f"--workdir={tmp_path / 'runs'}", f"--out_dir={out}", "--lengths=256")
  assert "summary (avg harness score" in stdout and "retrieval beyond the 64-token" in stdout
  files = sorted(os.listdir(out))
  assert files == sorted(["longctx_ablation.json", "longctx_ablation.md",
                          "longctx_ablation_metrics.csv", "longctx_ablation_vs_length.png",
                          "short_to_long_loss.png"])
  assert all(os.path.getsize(out / f) < 16 << 20 for f in files)
  for png in ("longctx_ablation_vs_length.png", "short_to_long_loss.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  report = json.loads((out / "longctx_ablation.json").read_text())
  assert report["errors"] == {}
  assert set(report["methods"]) == set(ablation.METHODS) | {"infllmv2_training_free"}
  free = report["methods"].pop("infllmv2_training_free")
  assert free["weights"] == "dense continuation" and 0.0 <= free["avg_score"] <= 1.0
  assert "training_free_over_dense_avg_score" in report["summary"]
  for method, r in report["methods"].items():
    assert 0.0 <= r["avg_score"] <= 1.0
    assert set(r["tasks"]) == {"passkey"} and set(r["tasks"]["passkey"]) == {"256"}
    assert all(0.0 <= s <= 1.0 for by_l in r["tasks"].values() for s in by_l.values())
    assert set(r["long_ppl"]) == {"256"} and all(1.0 < p < 1e4 for p in r["long_ppl"].values())
    assert r["train"]["initial_eval"]["loss"] > 0  # the validation loss right after the switch
    assert r["train"]["tokens"] == report["methods"]["dense"]["train"]["tokens"]
  assert report["methods"]["infllmv2"]["train"]["attention"] == "infllmv2"
  assert report["methods"]["sliding_window"]["train"]["attention_options"] == {"window": 64}
  sparse = report["sparse"]
  assert sparse["sparse_eval_lengths"] == [256] and sparse["dense_eval_lengths"] == []
  assert sparse["visible_fraction_last_token"] == {"256": 0.25}
  assert sparse["continuation_runs_sparse"]
  assert {"pretrain", "continue_infllmv2", "eval_sliding_window"} <= set(report["phase_seconds"])
  md = (out / "longctx_ablation.md").read_text()
  assert "| infllmv2 |" in md and "| infllmv2_training_free |" in md
  assert "### infllmv2 (1 prompts" in md and "### dense (1" in md
  for method in ("dense", "infllmv2"):  # the selection probe, one row per layer
    sel = report["methods"][method]["selection"]
    assert sel["prompts"] == 1 and len(sel["layers"]) == report["model"]["num_layers"]
    assert 0.0 <= sel["layers"][0]["selected"] <= 1.0
  assert report["methods"]["sliding_window"]["selection"] is None
  for method in ("infllmv2", "nosa"):  # decode locality, one row per layer
    loc = report["methods"][method]["locality"]
    assert loc["steps"] == 16 and len(loc["layers"]) == report["model"]["num_layers"]
    assert 0.0 <= loc["layers"][0]["hit_rate"] <= 1.0
  assert report["methods"]["dense"]["locality"] is None
  assert set(report["summary"]["decode_hit_rate"]) == {"infllmv2", "nosa"}
  assert "nosa_over_infllmv2_avg_score" in report["summary"]
  assert "## Decode locality" in md and "| nosa | 16 |" in md

  with open(out / "longctx_ablation_metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert {r["phase"] for r in rows} == {"pretrain", *ablation.METHODS}
  for m in ablation.METHODS:  # each continuation's validation loss at step 0 (the switch)
    assert any(r["phase"] == m and r["split"] == "eval" and r["step"] == "0" for r in rows)
