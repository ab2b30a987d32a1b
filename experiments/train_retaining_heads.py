"""Trains Locret's retaining heads beside a frozen pretrained backbone (arXiv 2410.01805).

  python -m experiments.train_retaining_heads --config=configs/locret.py \
      --config.backbone_workdir=runs/pretrain_100m --config.workdir=runs/locret_100m \
      [--config.data.lengths=16384 --config.train.steps=1000 ...]

Loads the backbone with `load_model` (its max_seq_len is raised to the longest training length
when needed: RoPE has no table), builds synthetic long-context examples (sparsejax.train.locret:
RULER-style tasks with their gold answers and plain training-split text), labels them with the
backbone's causal importance scores and trains only the heads. Writes <workdir>/checkpoints
(orbax: heads, optimizer state, next batch; a rerun resumes), <workdir>/logs (CSV/TensorBoard),
<workdir>/retaining_heads (the exported heads, `load_retaining_heads`) and
<workdir>/summary.json, and prints held-out ranking metrics of the untrained and trained heads.
"""
import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app, logging
from flax import nnx
from ml_collections import config_flags

from sparsejax.config import ModelConfig
from sparsejax.layers.retaining_heads import (RetainingHeads, config_differences,
                                              save_retaining_heads)
from sparsejax.model import DecoderLM
from sparsejax.train import locret
from sparsejax.train.checkpoint import Checkpointer, load_model
from sparsejax.train.metrics import MetricsWriter
from sparsejax.train.optim import make_optimizer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/locret.py", "Experiment config file.")
_STEP_KEYS = ("tokens", "answer_start", "answer_end")


def _evaluate(predict, head_params, backbone_state, batches, fraction) -> dict[str, float]:
  """Ranking metrics (locret.score_metrics) per held-out example, averaged over all examples and
  separately over the task and plain-text ones."""
  rows = []
  for batch in batches:
    preds, labels, mask = jax.device_get(
        predict(head_params, backbone_state, {k: batch[k] for k in _STEP_KEYS}))
    for i in range(preds.shape[1]):
      m = locret.score_metrics(preds[:, i:i + 1], labels[:, i:i + 1], mask[i:i + 1], fraction)
      rows.append((bool(batch["is_task"][i]), m))
  out = {name: float(np.mean([m[name] for _, m in rows])) for name in rows[0][1]}
  for kind, is_task in (("task", True), ("text", False)):
    chosen = [m["recall"] for t, m in rows if t == is_task]
    if chosen:
      out[f"recall_{kind}"] = float(np.mean(chosen))
  return out


def _with_max_seq_len(model: DecoderLM, max_seq_len: int) -> DecoderLM:
  """The same parameters under a larger max_seq_len (a bound the model checks; RoPE has no
  position table, so longer contexts than pretrained run unchanged)."""
  config = dataclasses.replace(model.config, max_seq_len=max_seq_len)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def _check_resumable(saved: dict, run_meta: dict) -> None:
  diffs = config_differences(ModelConfig.from_dict(saved["model"]),
                             ModelConfig.from_dict(run_meta["model"]))
  for key in ("hidden", "backbone_step"):
    if saved.get(key) != run_meta[key]:
      diffs.append(f"{key}: {saved.get(key)!r} (checkpoint) vs {run_meta[key]!r} (this run)")
  if diffs:
    raise ValueError("the heads checkpoint in this workdir was trained for another backbone or "
                     "head size (" + "; ".join(diffs) + "); choose a new --config.workdir")


def main(argv):
  del argv
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)
  examples = locret.ExampleConfig(**config.data)
  train = config.train
  if train.batch_size < 1 or config.eval.examples < 1:
    raise ValueError(f"train.batch_size and eval.examples must be positive, got "
                     f"{train.batch_size} and {config.eval.examples}")
  step_arg = None if config.backbone_step < 0 else config.backbone_step
  model, tokenizer, backbone_meta = load_model(config.backbone_workdir, step_arg)
  if max(examples.lengths) > model.config.max_seq_len:
    model = _with_max_seq_len(model, max(examples.lengths))

  def make_heads():
    return RetainingHeads(model.config, config.heads.hidden, rngs=nnx.Rngs(train.seed))

  heads = nnx.eval_shape(make_heads)
  tx, schedule = make_optimizer(train)
  lr_at = jax.jit(schedule)
  backbone_graphdef, backbone_state = nnx.split(model)
  heads_graphdef = nnx.graphdef(heads)
  # Initialised in one compiled call (eagerly, each initialiser compiles on its own), and
  # committed to the backbone's device like the step's outputs, so the step compiles once.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  initial_params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make_heads())),
                           out_shardings=device)()
  head_params = jax.tree.map(lambda x: x.copy(), initial_params)  # the train step donates
  opt_state = jax.device_put(tx.init(head_params), device)
  train_step = locret.make_train_step(backbone_graphdef, heads_graphdef, tx,
                                      answer_max_len=examples.answer_max_len,
                                      smooth_weight=train.smooth_weight)
  predict = locret.make_predict_fn(backbone_graphdef, heads_graphdef,
                                   answer_max_len=examples.answer_max_len)
  source = locret.ExampleSource(tokenizer, examples)
  run_meta = {"model": model.config.to_dict(), "hidden": heads.hidden,
              "backbone_workdir": os.path.abspath(config.backbone_workdir),
              "backbone_step": backbone_meta["step"]}

  os.makedirs(config.workdir, exist_ok=True)
  checkpointer = Checkpointer(os.path.join(config.workdir, "checkpoints"),
                              max_to_keep=train.keep_checkpoints)
  step = 0
  if checkpointer.latest_step() is not None:
    if not config.resume:
      raise ValueError(f"workdir {config.workdir} already holds heads checkpoints; set "
                       "--config.resume=True to continue or choose a new --config.workdir")
    _check_resumable(checkpointer.read_meta(), run_meta)
    restored = checkpointer.restore(params=head_params, opt_state=opt_state)
    head_params, opt_state = restored["params"], restored["opt_state"]
    step = int(restored["data"]["next_batch"])
    print(f"resuming the heads from step {step} ({config.workdir})")
  print(f"backbone: {config.backbone_workdir} step {backbone_meta['step']}, "
        f"{model.config.num_layers} layers x {model.config.num_kv_heads} KV heads; retaining "
        f"heads: {heads.num_params() / 1e6:.2f}M parameters (hidden {heads.hidden}); lengths "
        f"{list(examples.lengths)}, task fraction {examples.task_fraction}", flush=True)

  heldout = [source.batch("heldout", i, 1) for i in range(config.eval.examples)]
  fraction = config.eval.recall_fraction
  before = _evaluate(predict, initial_params, backbone_state, heldout, fraction)
  writer = MetricsWriter(os.path.join(config.workdir, "logs"))
  if step == 0:
    writer.write("eval", 0, before)

  from tqdm import tqdm
  bar = tqdm(total=train.steps, initial=step, desc="heads", unit="step", dynamic_ncols=True)
  start_step, start = step, time.perf_counter()
  timed_tokens, timed_start = 0, None  # throughput after the first (compiling) step
  while step < train.steps:
    batch = source.batch("train", step, train.batch_size)
    head_params, opt_state, metrics = train_step(head_params, opt_state, backbone_state,
                                                 {k: batch[k] for k in _STEP_KEYS})
    step += 1
    if timed_start is None:
      jax.block_until_ready(head_params)
      timed_start = time.perf_counter()
    else:
      timed_tokens += batch["tokens"].size
    if step % train.log_every == 0 or step == train.steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["lr"] = float(lr_at(step - 1))
      writer.write("train", step, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", fit=f"{metrics['fit_loss']:.4f}")
    every = train.checkpoint_every
    if step == train.steps or (every > 0 and step % every == 0):
      checkpointer.save(step, params=head_params, opt_state=opt_state,
                        data_state={"next_batch": step}, meta=run_meta | {"step": step})
    bar.update(1)
  bar.close()
  jax.block_until_ready(head_params)
  end = time.perf_counter()
  checkpointer.close()
  tokens_per_s = timed_tokens / (end - timed_start) if timed_tokens else None
  if step > start_step:
    rate = f", {tokens_per_s:,.0f} tokens/s after the first step" if tokens_per_s else ""
    print(f"trained steps {start_step}-{step} in {end - start:.1f} s{rate}")

  after = _evaluate(predict, head_params, backbone_state, heldout, fraction)
  writer.write("eval", step, after)
  writer.close()
  heads = nnx.merge(heads_graphdef, head_params)
  export = save_retaining_heads(heads, os.path.join(config.workdir, "retaining_heads"),
                                meta=run_meta | {"steps": step, "heldout": after})
  summary = {"steps": step, "trained_steps_this_run": step - start_step,
             "seconds_this_run": round(end - start, 1), "tokens_per_s": tokens_per_s,
             "heads_params": heads.num_params(), "heldout_untrained": before,
             "heldout_trained": after, "export": os.path.abspath(export),
             "config": config.to_dict(), **run_meta}
  with open(os.path.join(config.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  pct = f"{fraction:.0%}"
  print(f"held-out ({len(heldout)} examples): recall@{pct} untrained {before['recall']:.3f} -> "
        f"trained {after['recall']:.3f} (chance {after['chance']:.3f}); spearman "
        f"{before['spearman']:.3f} -> {after['spearman']:.3f}; pearson {before['pearson']:.3f} "
        f"-> {after['pearson']:.3f}")
  kinds = [f"{k} {after[f'recall_{k}']:.3f}" for k in ("task", "text") if f"recall_{k}" in after]
  print(f"trained recall@{pct} by kind: " + ", ".join(kinds))
  print(f"exported heads to {export}")


if __name__ == "__main__":
  app.run(main)
