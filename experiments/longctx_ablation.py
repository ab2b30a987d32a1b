"""Issue 4's long-context ablation (with issue 3's short-to-long curves) in one command.

GPU command (one H100, from the repo root, over the image's jax/flax/optax/orbax; grain,
ml-collections and tensorboardX installed from .whl/ first, see README "Running on a GPU"):

  PYTHONPATH=. python3 -m experiments.longctx_ablation --scale=gpu --out_dir=$OUT

Local test size: `python -m experiments.longctx_ablation --scale=cpu_tiny --workdir=/tmp/lc
--out_dir=/tmp/lc_out` (about a minute on a laptop CPU).

Phases (each prints and records its wall-clock seconds):
  1 pretrain   dense at 4k on the built-in corpus (configs/longctx_ablation.py:<scale>). A finished
               run in <workdir>/pretrain is reused, so the command can be resumed.
  2 continue   dense, InfLLM-V2 and sliding window at 16k, each from the pretraining checkpoint
               (`train.init_from`) with the same steps, batch, learning rate and seeds. A finished
               continuation is reused.
  3 evaluate   per method: the RULER-style harness (`sparsejax.eval.evaluate`: needle tasks at
               4k/8k/16k with swept depths), the long perplexity (`long_perplexity`) at the
               same lengths, and for dense and InfLLM-V2 the selection probe
               (`sparsejax.eval.selection`: is the needle's block among those InfLLM-V2 selects,
               and would the exact attention have ranked it in?). With
               ablation.eval.training_free, the dense continuation's weights are also evaluated
               under InfLLM-V2 attention ("infllmv2_training_free").
Outputs in --out_dir (5 files, rewritten after every phase so a run cut short still returns what
it finished): longctx_ablation.json (`methods`: {method: {"avg_score", "tasks": {task: {length:
score}}, "long_ppl": {length: ppl}, ...}} plus settings, visible fractions, commands and phase
times), longctx_ablation.md (the tables), longctx_ablation_vs_length.png (average score vs length,
one line per method), short_to_long_loss.png (the pretraining curve, then the three continuations'
training and validation loss after the switch) and longctx_ablation_metrics.csv (every phase's
train and eval log in one file). `--replot` rewrites the summary and markdown and redraws the two
PNGs from the JSON and CSV alone (e.g. after adding a statistic to the report), or
on a laptop when the GPU image lacks matplotlib.

Time at --scale=gpu, measured on one H100 (2026-12-06): pretraining 350 s (1000 steps, 316 s
of them stepping at 432k tokens/s); continuations 37 s dense, 97 s InfLLM-V2 (199k tokens/s: the
sparse backward), 29 s sliding window; evaluations 51 s, 61 s and 28 s (harness and long
perplexity); 331 s after the pretraining. The selection probe and the training-free row came
later and are not yet timed (estimate: 2 minutes more). So more than one 10-minute device
command in all: run the pretraining first on its own,

  PYTHONPATH=. python3 -m experiments.pretrain --config=configs/longctx_ablation.py:gpu \
      --config.workdir=runs/longctx_ablation_gpu/pretrain

and this binary next on the same warm machine: it reuses the finished pretraining. If a phase
overruns, shrink --continue_steps / --samples.
"""
import csv
import gc
import json
import math
import os
import shutil
import sys
import time
import traceback

_START = time.time()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from configs import longctx_ablation as ablation_config  # noqa: E402
from sparsejax.eval import DEPTH_TASKS, TASKS, compare_methods, evaluate  # noqa: E402
from sparsejax.eval import long_perplexity, paired_bootstrap, write_results  # noqa: E402
from sparsejax.eval.harness import _jsonable  # noqa: E402
from sparsejax.eval.locality import selection_locality  # noqa: E402
from sparsejax.eval.selection import needle_prompt, run_probe, table_lines  # noqa: E402
from sparsejax.eval.tasks import make_sample  # noqa: E402
from sparsejax.model import with_config  # noqa: E402
from sparsejax.ops.infllmv2 import InfLLMv2Config  # noqa: E402
from sparsejax.train.trainer import Trainer  # noqa: E402

METHODS = ablation_config.METHODS
JSON_NAME, MD_NAME = "longctx_ablation.json", "longctx_ablation.md"
CSV_NAME, ACC_PNG, LOSS_PNG = ("longctx_ablation_metrics.csv", "longctx_ablation_vs_length.png",
                               "short_to_long_loss.png")
COLORS = {"dense": "tab:blue", "infllmv2": "tab:red", "sliding_window": "tab:green",
          "nosa": "tab:purple"}
# The dense continuation's weights evaluated under InfLLM-V2 attention (no sparse training).
TRAINING_FREE = "infllmv2_training_free"
# What the paper's result looks like at this scale (issue 4): the thresholds behind "met".
MIN_SCORE_RATIO = 0.95     # InfLLM-V2 keeps >= 95% of dense's average harness score
MAX_PPL_RATIO = 1.05       # "close to" dense's long perplexity: within 5% at every length
MIN_BEYOND_MARGIN = 0.10   # "clearly beats" the window beyond it: 10 points of retrieval score

_SCALE = flags.DEFINE_enum("scale", "gpu", ablation_config.SCALES,
                           "Preset of configs/longctx_ablation.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root of the run directories (<root>/pretrain, "
                               "<root>/<method>); default runs/longctx_ablation_<scale>.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the results go (default <root>/results; "
                               "experiments/results only when named).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Continuations, from {list(METHODS)}.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", None, "Pretraining steps.")
_PRETRAIN_BATCH = flags.DEFINE_integer("pretrain_batch_size", None, "Pretraining rows per step.")
_CONTINUE_STEPS = flags.DEFINE_integer("continue_steps", None, "Steps of each continuation.")
_CONTINUE_BATCH = flags.DEFINE_integer("continue_batch_size", None, "Continuation rows per step.")
_CONTINUE_LEN = flags.DEFINE_integer("continue_len", None, "Continuation sequence length.")
_SLIDING_KIND = flags.DEFINE_enum("sliding_kind", None, ablation_config.SLIDING_KINDS,
                                  "The sliding-window baseline: cuDNN's window or InfLLM-V2's "
                                  "local blocks only.")
_TASKS = flags.DEFINE_list("tasks", None, f"Harness tasks, from {sorted(TASKS)}.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Evaluated lengths in tokens (harness and ppl).")
_DEPTHS = flags.DEFINE_list("depths", None, "Needle depths in [0, 1].")
_SAMPLES = flags.DEFINE_integer("samples", None, "Samples per (task, length, depth) cell.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Generated tokens per prompt.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", None, "Prompts per generation batch.")
_PPL_DOCS = flags.DEFINE_integer("ppl_docs", None, "Documents per long-perplexity length.")
_PPL_TAIL = flags.DEFINE_integer("ppl_tail", None, "Scored tokens at the end of each document.")
_PROGRESS = flags.DEFINE_bool("progress", False, "Show the trainer's progress bars.")
_REPLOT = flags.DEFINE_bool("replot", False, f"Only rewrite the summary, the markdown and the "
                            f"PNGs from <out_dir>/{JSON_NAME} and <out_dir>/{CSV_NAME}.")


def elapsed() -> str:
  return f"[{time.time() - _START:6.1f}s]"


def say(msg: str) -> None:
  print(f"{elapsed()} {msg}", flush=True)


# ---- configuration --------------------------------------------------------------------------

def _positive(name: str, value) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f"--{name} must be a positive int, got {value!r}")


def build_config():
  """The pretraining config of --scale with the flags applied (continuations derive from it)."""
  c = ablation_config.pretrain_config(_SCALE.value)
  a = c.ablation
  for name, flag in (("pretrain_steps", _PRETRAIN_STEPS), ("pretrain_batch_size", _PRETRAIN_BATCH),
                     ("continue_steps", _CONTINUE_STEPS), ("continue_batch_size", _CONTINUE_BATCH),
                     ("continue_len", _CONTINUE_LEN), ("samples", _SAMPLES),
                     ("max_new_tokens", _MAX_NEW), ("eval_batch_size", _EVAL_BATCH),
                     ("ppl_docs", _PPL_DOCS), ("ppl_tail", _PPL_TAIL)):
    _positive(name, flag.value)
  a.root = _WORKDIR.value or a.root
  c.workdir = os.path.join(a.root, "pretrain")
  if _PRETRAIN_STEPS.value:
    c.train.update(steps=_PRETRAIN_STEPS.value, checkpoint_every=_PRETRAIN_STEPS.value,
                   warmup_steps=min(c.train.warmup_steps, _PRETRAIN_STEPS.value))
  if _PRETRAIN_BATCH.value:
    c.train.batch_size = _PRETRAIN_BATCH.value
  cont = a.continuation
  if _CONTINUE_STEPS.value:
    cont.update(steps=_CONTINUE_STEPS.value,
                warmup_steps=min(cont.warmup_steps, _CONTINUE_STEPS.value))
  if _CONTINUE_BATCH.value:
    cont.batch_size = _CONTINUE_BATCH.value
  if _CONTINUE_LEN.value:
    cont.update(seq_len=_CONTINUE_LEN.value, max_seq_len=max(cont.max_seq_len,
                                                             2 * _CONTINUE_LEN.value))
  if _SLIDING_KIND.value:
    a.sliding_kind = _SLIDING_KIND.value
  methods = list(_METHODS.value)
  if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
    raise ValueError(f"--methods must list distinct methods from {list(METHODS)}, got {methods}")
  a.methods = tuple(methods)
  ev = a.eval
  if _TASKS.value is not None:
    unknown = sorted(set(_TASKS.value) - set(TASKS))
    if not _TASKS.value or unknown:
      raise ValueError(f"--tasks must name tasks from {sorted(TASKS)}, got {_TASKS.value}")
    ev.tasks = tuple(_TASKS.value)
  if _LENGTHS.value is not None:
    try:
      ev.lengths = tuple(int(x) for x in _LENGTHS.value)
    except ValueError:
      raise ValueError(f"--lengths must be ints (tokens), got {_LENGTHS.value}") from None
  if _DEPTHS.value is not None:
    try:
      ev.depths = tuple(float(x) for x in _DEPTHS.value)
    except ValueError:
      raise ValueError(f"--depths must be numbers in [0, 1], got {_DEPTHS.value}") from None
  for name, flag in (("samples", _SAMPLES), ("max_new_tokens", _MAX_NEW),
                     ("batch_size", _EVAL_BATCH), ("ppl_docs", _PPL_DOCS),
                     ("ppl_tail", _PPL_TAIL)):
    if flag.value:
      ev[name] = flag.value
  # Catch what would only fail after minutes of training.
  if not ev.lengths or min(ev.lengths) <= ev.ppl_tail:
    raise ValueError(f"--lengths must be non-empty ints above ppl_tail={ev.ppl_tail}, got "
                     f"{ev.lengths}")
  room = max(cont.max_seq_len, cont.seq_len)
  if max(ev.lengths) + ev.max_new_tokens + 8 > room:  # + bos and a tokenizer's few tokens slack
    raise ValueError(f"--lengths: {max(ev.lengths)} tokens + max_new_tokens={ev.max_new_tokens} "
                     f"do not fit the continuation's max_seq_len={room}")
  if any(not 0.0 <= d <= 1.0 for d in ev.depths) or not ev.depths:
    raise ValueError(f"--depths must be numbers in [0, 1], got {ev.depths}")
  for m in methods:  # the derivation's own checks (dense_len, sliding kind), before any work
    ablation_config.continuation_config(c, m)
  return c


def num_params(config) -> int:
  """Parameters of the config's model, from shapes alone (no arrays are made)."""
  from flax import nnx

  from sparsejax.config import ModelConfig
  from sparsejax.model import DecoderLM
  model = nnx.eval_shape(lambda: DecoderLM(ModelConfig.from_dict(config.model), rngs=nnx.Rngs(0)))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def tokens_per_step(config) -> int:
  return int(config.train.batch_size * config.data.seq_len)


def sparse_settings(config) -> dict:
  """InfLLM-V2's budget, and which evaluated lengths run dense or sparse (and how sparse)."""
  a = config.ablation
  s, ev, cont = dict(a.sparse), a.eval, a.continuation
  visible = ablation_config.visible_tokens(config)
  fractions, work, dense_lengths = {}, {}, []
  for length in ev.lengths:
    # The harness's kv length: bos + prompt + generated tokens; the perplexity's: the length.
    harness_dense = length + 1 + ev.max_new_tokens < s["dense_len"]
    if harness_dense or length < s["dense_len"]:
      dense_lengths.append(int(length))
    fractions[int(length)] = 1.0 if harness_dense else min(1.0, visible / length)
    # Share of causal dense attention's query-key pairs the sparse path computes at this length.
    p = np.arange(1, length + 1)
    work[int(length)] = float(np.minimum(p, visible).sum() / p.sum())
  return {**s, "selected_topk_blocks": s["topk"] - s["init_blocks"] - s["local_blocks"],
          "visible_tokens": visible, "window": visible, "sliding_kind": a.sliding_kind,
          "visible_fraction_last_token": fractions, "attention_pairs_fraction": work,
          "dense_eval_lengths": dense_lengths,
          "sparse_eval_lengths": [int(x) for x in ev.lengths if int(x) not in dense_lengths],
          "continuation_runs_sparse": cont.seq_len >= s["dense_len"],
          "visible_fraction_at_continuation_len": min(1.0, visible / cont.seq_len)}


# ---- phases ---------------------------------------------------------------------------------

def train_phase(config) -> dict:
  """Trains (or reuses a finished run in config.workdir); returns the model, tokenizer, info."""
  trainer = Trainer(config, progress=_PROGRESS.value)
  start_step = trainer.step
  summary = trainer.train()
  info = {"workdir": config.workdir, "params": int(trainer.num_params),
          "reused_finished_run": start_step >= config.train.steps, "start_step": int(start_step),
          "steps": int(trainer.step), "tokens_per_step": tokens_per_step(config),
          "tokens": tokens_per_step(config) * int(trainer.step),
          "tokens_per_s": summary.get("tokens_per_s"), "mfu": summary.get("mfu"),
          "initial_eval": summary.get("initial_eval"), "final_eval": summary.get("final_eval"),
          "attention": config.model.attention,
          "attention_options": config.model.attention_options.to_dict()}
  model, tokenizer = trainer.model(), trainer.tokenizer
  trainer.close()
  del trainer
  gc.collect()
  return {"model": model, "tokenizer": tokenizer, "info": info}


def window_retrieval(cells: dict, window: int) -> dict:
  """Mean needle-task score where the needle lies beyond / within `window` tokens of the question.

  A needle at depth d of an L-token prompt sits about (1 - d) * L tokens before the question
  (multi_key's distractors are elsewhere, so this is the asked needle's distance).
  """
  beyond, within, by_length = [], [], {}
  for task, by_l in cells.items():
    if task not in DEPTH_TASKS:
      continue
    for length, by_d in by_l.items():
      for depth, value in by_d.items():
        far = (1.0 - float(depth)) * float(length) > window
        (beyond if far else within).append(value)
        if far:
          by_length.setdefault(int(length), []).append(value)
  mean = lambda v: float(np.mean(v)) if v else None
  return {"beyond": mean(beyond), "within": mean(within), "window": int(window),
          "beyond_by_length": {l: mean(v) for l, v in sorted(by_length.items())}}


def eval_phase(method: str, model, tokenizer, config) -> dict:
  ev = config.ablation.eval
  start = time.time()
  results = evaluate(model, tokenizer, list(ev.tasks), [int(x) for x in ev.lengths],
                     [float(x) for x in ev.depths], int(ev.samples), int(ev.seed),
                     int(ev.max_new_tokens), int(ev.batch_size), haystack=ev.haystack)
  harness_s = time.time() - start
  say(f"{method}: harness avg score {results['avg_score']:.3f} ({harness_s:.1f} s)")
  start = time.time()
  ppl = long_perplexity(model, tokenizer, [int(x) for x in ev.lengths], int(ev.ppl_tail),
                        int(ev.ppl_docs), int(ev.seed))
  ppl_s = time.time() - start
  say(f"{method}: long ppl " + ", ".join(f"{l}: {v:.3f}" for l, v in ppl.items())
      + f" ({ppl_s:.1f} s)")
  selection = None
  if method in ("dense", "infllmv2"):  # the sliding window selects nothing
    start = time.time()
    pr = ev.probe
    selection = run_probe(model, tokenizer, InfLLMv2Config(**config.ablation.sparse.to_dict()),
                          tasks=list(pr.tasks), lengths=[int(x) for x in pr.lengths],
                          depths=[float(x) for x in pr.depths], samples=int(pr.samples),
                          seed=int(ev.seed), haystack=ev.haystack)
    selection["seconds"] = round(time.time() - start, 1)
    unforced = [r["selected_unforced"] for r in selection["layers"]
                if r["selected_unforced"] is not None]
    say(f"{method}: selection probe, needle block selected (unforced cases) "
        + (f"{100 * min(unforced):.0f}-{100 * max(unforced):.0f}% over layers"
           if unforced else "- (every case forced)") + f" ({selection['seconds']} s)")
  locality = None
  if method in ("infllmv2", "nosa"):
    start = time.time()
    sample = make_sample(ev.tasks[0], tokenizer, max(int(x) for x in ev.lengths), depth=0.5,
                         seed=int(ev.seed), haystack=ev.haystack)
    tokens = needle_prompt(tokenizer, sample.prompt, sample.answers).tokens
    steps = min(int(ev.get("locality_steps", 256)), len(tokens))
    locality = {"steps": steps, "prompt_tokens": len(tokens),
                "layers": selection_locality(model, tokens, steps)}
    locality["seconds"] = round(time.time() - start, 1)
    hits = [r["hit_rate"] for r in locality["layers"]]
    say(f"{method}: decode locality, adjacent steps' shared blocks {100 * min(hits):.1f}-"
        f"{100 * max(hits):.1f}% over layers ({locality['seconds']} s)")
  out = {"avg_score": results["avg_score"], "tasks": results["tasks"], "long_ppl": ppl,
         "selection": selection, "locality": locality,
         "task_avg": results["task_avg"], "length_avg": results["length_avg"],
         "cells": results["cells"],
         "retrieval": window_retrieval(results["cells"], ablation_config.visible_tokens(config)),
         "seconds": {"harness": round(harness_s, 1), "long_ppl": round(ppl_s, 1)},
         "samples": results["samples"]}
  try:  # per-method heat maps and tables beside the runs (not returned: the out_dir file cap)
    write_results({"method": method, **out}, os.path.join(config.ablation.root, "eval", method))
  except ImportError as e:
    say(f"{method}: per-method plots skipped ({e})")
  return out


# ---- logs and plots -------------------------------------------------------------------------

def _read_csv(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return [{k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)]


def merge_logs(config, methods, path: str) -> None:
  """Every phase's train/eval CSV in one file, with the phase, split and tokens seen so far."""
  phases = [("pretrain", config)] + [(m, ablation_config.continuation_config(config, m))
                                     for m in methods]
  rows, columns = [], ["phase", "split", "step", "tokens"]
  for phase, cfg in phases:
    per_step = tokens_per_step(cfg)
    for split in ("train", "eval"):
      for row in _read_csv(os.path.join(cfg.workdir, "logs", f"{split}_metrics.csv")):
        step = int(row.pop("step"))
        row = {"phase": phase, "split": split, "step": step, "tokens": step * per_step, **row}
        rows.append(row)
        columns += [k for k in row if k not in columns]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_losses(csv_path: str, png_path: str, short_len: int, long_len: int) -> None:
  """Left: loss vs tokens, pretraining at `short_len` then each continuation at `long_len` from
  the switch on. Right: the continuations alone vs step; step 0 is the validation loss right
  after the switch (the pretrained weights under each attention at long_len, before any
  update)."""
  plt = _plt()
  rows = []
  with open(csv_path, newline="") as f:
    for row in csv.DictReader(f):
      rows.append(row)
  get = lambda phase, split, key: sorted(
      (int(r["step"]), int(r["tokens"]), float(r[key])) for r in rows
      if r["phase"] == phase and r["split"] == split and r.get(key) not in (None, ""))
  pre_train, pre_eval = get("pretrain", "train", "loss"), get("pretrain", "eval", "loss")
  switch = max([t for _, t, _ in pre_train + pre_eval], default=0)
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  if pre_train:
    left.plot([t / 1e6 for _, t, _ in pre_train], [v for *_, v in pre_train], color="0.4",
              lw=1, label=f"pretrain dense @{short_len} (train)")
  if pre_eval:
    left.plot([t / 1e6 for _, t, _ in pre_eval], [v for *_, v in pre_eval], "ko", ms=4,
              label="pretrain (validation)")
    right.axhline(pre_eval[-1][2], color="0.4", ls=":", lw=1,
                  label=f"pretrained, validation @{short_len} ({pre_eval[-1][2]:.3f})")
  phases = [p for p in METHODS if any(r["phase"] == p for r in rows)]
  for phase in phases:
    color = COLORS.get(phase)
    tr, ev = get(phase, "train", "loss"), get(phase, "eval", "loss")
    if tr:
      left.plot([(switch + t) / 1e6 for _, t, _ in tr], [v for *_, v in tr], color=color, lw=1,
                label=f"{phase} @{long_len} (train)")
      right.plot([s for s, _, _ in tr], [v for *_, v in tr], color=color, lw=1.2,
                 label=f"{phase} (train)")
    if ev:
      left.plot([(switch + t) / 1e6 for _, t, _ in ev], [v for *_, v in ev], "s", color=color,
                ms=4)
      right.plot([s for s, _, _ in ev], [v for *_, v in ev], "s--", color=color, ms=5, lw=0.8,
                 label=f"{phase} (validation; step 0 = right after the switch)")
  if switch:
    left.axvline(switch / 1e6, color="0.6", ls="--", lw=1)
    left.text(switch / 1e6, left.get_ylim()[1], f" switch to {long_len}", va="top",
              fontsize=8)
  left.set_xlabel("training tokens (millions)")
  left.set_title(f"short-to-long: dense pretraining at {short_len}, continued at {long_len}")
  right.set_xlabel("continuation step")
  right.set_title("after the switch")
  for ax in (left, right):
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)


def plot_accuracy(report: dict, png_path: str, scratch: str) -> None:
  """Average harness score vs length, one line per method: `compare_methods` over one JSON per
  method (written to `scratch`); only its PNG is kept."""
  os.makedirs(scratch, exist_ok=True)
  paths = []
  for method, r in report["methods"].items():
    if "length_avg" not in r:
      continue
    paths.append(os.path.join(scratch, f"{method}.json"))
    with open(paths[-1], "w", encoding="utf-8") as f:
      json.dump(_jsonable({"method": method, "avg_score": r["avg_score"],
                           "length_avg": r["length_avg"]}), f)
  if paths:
    _, png = compare_methods(paths, os.path.join(scratch, "compare"))
    shutil.copyfile(png, png_path)


def draw_plots(out_dir: str, scratch: str) -> list[str]:
  """Both PNGs from the files in out_dir (so `--replot` can redraw them anywhere)."""
  done = []
  try:
    with open(os.path.join(out_dir, JSON_NAME), encoding="utf-8") as f:
      report = json.load(f)
    if os.path.exists(os.path.join(out_dir, CSV_NAME)):
      plot_losses(os.path.join(out_dir, CSV_NAME), os.path.join(out_dir, LOSS_PNG),
                  report["pretrain"]["seq_len"], report["continuation"]["seq_len"])
      done.append(LOSS_PNG)
    if any("length_avg" in r for r in report.get("methods", {}).values()):
      plot_accuracy(report, os.path.join(out_dir, ACC_PNG), scratch)
      done.append(ACC_PNG)
  except ImportError as e:  # an image without matplotlib: JSON/MD/CSV still come back
    say(f"plots skipped ({e}); redraw them with --replot --out_dir=<these files>")
  return done


# ---- report ---------------------------------------------------------------------------------

def _fmt(v, pct=True) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def summarize(report: dict) -> dict:
  """Ratios against dense and the issue's expectations, from whatever methods are done."""
  m = report["methods"]
  s = {}
  dense, sparse, window, nosa = (m.get(k, {}) for k in
                                 ("dense", "infllmv2", "sliding_window", "nosa"))
  if "avg_score" in dense and "avg_score" in sparse:
    s["infllmv2_over_dense_avg_score"] = (sparse["avg_score"] / dense["avg_score"]
                                          if dense["avg_score"] > 0 else None)
    s["infllmv2_over_dense_long_ppl"] = {l: sparse["long_ppl"][l] / dense["long_ppl"][l]
                                         for l in dense["long_ppl"] if l in sparse["long_ppl"]}
    ratio = s["infllmv2_over_dense_avg_score"]
    s["met_score_ratio"] = None if ratio is None else ratio >= MIN_SCORE_RATIO
    s["met_ppl_ratio"] = all(r <= MAX_PPL_RATIO for r in s["infllmv2_over_dense_long_ppl"].values())
  if "retrieval" in sparse and "retrieval" in window:
    a, b = sparse["retrieval"]["beyond"], window["retrieval"]["beyond"]
    s["retrieval_beyond_window"] = {"infllmv2": a, "sliding_window": b,
                                    "dense": dense.get("retrieval", {}).get("beyond")}
    s["met_beyond_window"] = None if a is None or b is None else a - b >= MIN_BEYOND_MARGIN
  if "avg_score" in nosa and "avg_score" in sparse:  # NOSA's claim: near-lossless vs InfLLM-V2
    s["nosa_over_infllmv2_avg_score"] = (nosa["avg_score"] / sparse["avg_score"]
                                         if sparse["avg_score"] > 0 else None)
    s["nosa_over_infllmv2_long_ppl"] = {l: nosa["long_ppl"][l] / sparse["long_ppl"][l]
                                        for l in sparse["long_ppl"] if l in nosa["long_ppl"]}
  if sparse.get("locality") and nosa.get("locality"):  # and its cache hit rate
    s["decode_hit_rate"] = {k: float(np.mean([r["hit_rate"] for r in m[k]["locality"]["layers"]]))
                            for k in ("infllmv2", "nosa")}
  free = m.get(TRAINING_FREE, {})
  if "avg_score" in dense and "avg_score" in free:
    s["training_free_over_dense_avg_score"] = (free["avg_score"] / dense["avg_score"]
                                               if dense["avg_score"] > 0 else None)
  # Intervals over the prompts (paired: every method answered the same ones) against dense.
  s["paired_vs_dense"] = {k: paired_bootstrap(dense["samples"], r["samples"])
                          for k, r in m.items()
                          if k != "dense" and "samples" in r and "samples" in dense}
  s["thresholds"] = {"score_ratio": MIN_SCORE_RATIO, "ppl_ratio": MAX_PPL_RATIO,
                     "beyond_window_margin": MIN_BEYOND_MARGIN}
  return s


def markdown(report: dict) -> str:
  ev, sp = report["eval"], report["sparse"]
  lengths = [int(l) for l in ev["lengths"]]
  done = {k: v for k, v in report["methods"].items() if "avg_score" in v}
  head = (["method", "avg"] + [f"{t} {l}" for t in ev["tasks"] for l in lengths]
          + [f"beyond {sp['window']}"] + [f"ppl {l}" for l in lengths])
  lines = [f"# Long-context ablation ({report['scale']}): dense vs InfLLM-V2 vs sliding window "
           "vs NOSA",
           "", f"Scale: {report['scale_note']}", "",
           "Harness scores in percent (RULER string match, greedy); `beyond` = needle-task score "
           f"where the needle lies more than {sp['window']} tokens (the window) before the "
           "question; ppl = long perplexity of the last "
           f"{ev['ppl_tail']} tokens of {ev['ppl_docs']} validation documents.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method, r in done.items():
    cells = [method, _fmt(r["avg_score"])]
    cells += [_fmt(r["tasks"].get(t, {}).get(l, r["tasks"].get(t, {}).get(str(l))))
              for t in ev["tasks"] for l in lengths]
    cells.append(_fmt(r["retrieval"]["beyond"]))
    ppl = {int(k): v for k, v in r["long_ppl"].items()}
    cells += [_fmt(ppl.get(l), pct=False) for l in lengths]
    lines.append("| " + " | ".join(cells) + " |")
  for method, r in report["methods"].items():
    if "error" in r:
      lines.append(f"\n**{method} failed**: `{r['error']}`")
  s = report.get("summary", {})
  lines += ["", "## Against the paper's expectation", ""]
  if "infllmv2_over_dense_avg_score" in s:
    ratio = s["infllmv2_over_dense_avg_score"]
    lines.append(f"- InfLLM-V2 / dense average score: "
                 f"{'-' if ratio is None else f'{100 * ratio:.1f}%'} (expected >= "
                 f"{100 * MIN_SCORE_RATIO:.0f}%; met: {s['met_score_ratio']})")
    lines.append("- InfLLM-V2 / dense long perplexity: " + ", ".join(
        f"{l}: {v:.3f}" for l, v in s["infllmv2_over_dense_long_ppl"].items())
        + f" (expected <= {MAX_PPL_RATIO}; met: {s['met_ppl_ratio']})")
  if "retrieval_beyond_window" in s:
    r = s["retrieval_beyond_window"]
    lines.append(f"- Retrieval beyond the {sp['window']}-token window: InfLLM-V2 "
                 f"{_fmt(r['infllmv2'])}, sliding window {_fmt(r['sliding_window'])}, dense "
                 f"{_fmt(r['dense'])} (expected InfLLM-V2 >= sliding + "
                 f"{100 * MIN_BEYOND_MARGIN:.0f} points; met: {s['met_beyond_window']})")
  if "nosa_over_infllmv2_avg_score" in s:
    ratio = s["nosa_over_infllmv2_avg_score"]
    lines.append(f"- NOSA / InfLLM-V2 average score: "
                 f"{'-' if ratio is None else f'{100 * ratio:.1f}%'}; long perplexity: "
                 + ", ".join(f"{l}: {v:.3f}" for l, v in s["nosa_over_infllmv2_long_ppl"].items())
                 + " (the paper: near-lossless)")
  if "decode_hit_rate" in s:
    h = s["decode_hit_rate"]
    lines.append(f"- Adjacent decoding steps' shared blocks (an offloaded cache's hit rate): "
                 f"NOSA {100 * h['nosa']:.1f}%, InfLLM-V2 {100 * h['infllmv2']:.1f}% (the paper: "
                 "94.4% against 88.9%)")
  if "training_free_over_dense_avg_score" in s:
    ratio = s["training_free_over_dense_avg_score"]
    lines.append(f"- `{TRAINING_FREE}` (the dense continuation's weights under InfLLM-V2 "
                 "attention, never trained sparse) / dense average score: "
                 f"{'-' if ratio is None else f'{100 * ratio:.1f}%'}")
  if s.get("paired_vs_dense"):
    lines.append("- Average score against dense, with 95% bootstrap intervals over the prompts "
                 "(paired; they do not cover the run-to-run variance of training):")
    for k, p in s["paired_vs_dense"].items():
      ratio = ("-" if p["ratio"] is None else
               f"{100 * p['ratio']:.0f}% [{100 * p['ratio_ci95'][0]:.0f}, "
               f"{100 * p['ratio_ci95'][1]:.0f}]")
      lines.append(f"  - {k}: {100 * p['diff']:+.1f} points [{100 * p['diff_ci95'][0]:+.1f}, "
                   f"{100 * p['diff_ci95'][1]:+.1f}], ratio {ratio} ({p['n']} prompts)")
  probed = {k: v["selection"] for k, v in done.items() if v.get("selection")}
  if probed:
    pr = ev["probe"]
    lines += ["", "## Does the selection find the needle? (experiments.selection_probe)", "",
              f"InfLLM-V2's selection ({sp['selected_topk_blocks']} of the {sp['topk']} blocks "
              "chosen by score) applied to each model's own q and k, on "
              f"{', '.join(pr['tasks'])} prompts of {list(pr['lengths'])} tokens at depths "
              f"{list(pr['depths'])}; the queries are the last prompt token and the "
              "teacher-forced answer tokens. For dense it asks what InfLLM-V2 would select "
              "from a model trained dense.", ""]
    for method, sel in probed.items():
      lines += [f"### {method} ({sel['prompts']} prompts, {sel['seconds']} s)", ""]
      lines += table_lines(sel["layers"]) + [""]
  local = {k: v["locality"] for k, v in done.items() if v.get("locality")}
  if local:
    lines += ["", "## Decode locality (sparsejax.eval.locality)", "",
              "Per layer: the share of a step's selected blocks that the step before also "
              "selected (hit), and the blocks it adds (new: what an offloaded cache copies), "
              "over the last teacher-forced steps of one longest prompt.", "",
              "| method | steps | " + " | ".join(
                  f"layer {r['layer']} hit / new" for r in next(iter(local.values()))["layers"])
              + " |", "|" + "---|" * (2 + len(next(iter(local.values()))["layers"]))]
    for method, loc in local.items():
      lines.append(f"| {method} | {loc['steps']} | " + " | ".join(
          f"{100 * r['hit_rate']:.1f}% / {r['new_blocks']:.2f}" for r in loc["layers"]) + " |")
  pre, cont = report["pretrain"], report["continuation"]
  mix = report.get("retrieval_mix", {})
  lines += ["", "## Settings", "",
            f"- Model: {report['params'] / 1e6:.1f}M parameters, " + ", ".join(
                f"{k} {v}" for k, v in report["model"].items()
                if k in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                         "ffn_hidden", "vocab_size", "rope_base")) + "; byte tokenizer.",
            f"- Pretraining: dense at {pre['seq_len']}, {pre['steps']} steps x "
            f"{pre['tokens_per_step']} tokens = {pre['tokens'] / 1e6:.1f}M tokens.",
            f"- Continuations: {cont['seq_len']} tokens, {cont['steps']} steps x "
            f"{cont['tokens_per_step']} tokens = {cont['tokens'] / 1e6:.2f}M tokens each, lr "
            f"{cont['lr']}, from the pretraining checkpoint (same seeds).",
            f"- Retrieval rows (sparsejax/train/retrieval_mix.py): "
            f"{100 * mix.get('fraction', 0):.0f}% of the pretraining rows and "
            f"{100 * cont.get('retrieval_fraction', 0):.0f}% of the continuation rows are "
            f"generated tasks ({mix.get('tasks', '-')}) on {mix.get('haystacks', '-')} "
            "haystacks (training split), "
            + ("packed several to a row at log-uniform lengths" if mix.get("min_length")
               else "one filling each row")
            + ", with held-out seeds: the model knows the task formats, "
            "so the harness measures retrieval at each length and depth, not zero-shot skill.",
            f"- InfLLM-V2: blocks of {sp['block_size']}, init {sp['init_blocks']} + local "
            f"{sp['local_blocks']} + {sp['selected_topk_blocks']} top-k = {sp['topk']} blocks = "
            f"{sp['visible_tokens']} visible tokens "
            f"({100 * sp['visible_fraction_at_continuation_len']:.1f}% of {cont['seq_len']}), "
            f"dense_len {sp['dense_len']}. Visible at the last token: "
            + ", ".join(f"{l}: {100 * v:.1f}%"
                        for l, v in sp["visible_fraction_last_token"].items())
            + f". Evaluated lengths that run dense: {sp['dense_eval_lengths'] or 'none'}.",
            f"- Sliding window: {sp['window']} tokens ({sp['sliding_kind']}).",
            f"- Harness: tasks {list(ev['tasks'])}, lengths {lengths}, depths "
            f"{list(ev['depths'])}, {ev['samples']} samples per cell, {ev['max_new_tokens']} new "
            f"tokens, {ev['haystack']} haystack.",
            "", "## Commands", "", "```", report["command"]]
  lines += [f"# equivalent phase: {c}" for c in report["phase_commands"]]
  lines += ["```", "", "## Phase times (s)", "", "| phase | seconds |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in report["phase_seconds"].items()]
  return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str) -> None:
  report["summary"] = summarize(report)
  report["phase_seconds"].pop("total", None)  # re-inserted, so it stays the last row
  report["phase_seconds"]["total"] = round(time.time() - _START, 1)
  with open(os.path.join(out_dir, JSON_NAME), "w", encoding="utf-8") as f:
    json.dump(_jsonable(report), f, indent=1)
  with open(os.path.join(out_dir, MD_NAME), "w", encoding="utf-8") as f:
    f.write(markdown(_jsonable(report)))


def new_report(config) -> dict:
  a, cont = config.ablation, config.ablation.continuation
  argv = " ".join(sys.argv[1:])
  scale = a.scale
  pre_cmd = (f"python -m experiments.pretrain --config=configs/longctx_ablation.py:{scale} "
             f"--config.workdir={config.workdir}")
  note = ("toy sizes for the CPU test; the numbers mean nothing" if scale == "cpu_tiny" else
          f"a {num_params(config) / 1e6:.0f}M-parameter byte-level model, "
          f"{tokens_per_step(config) * config.train.steps / 1e6:.0f}M pretraining tokens at "
          f"{config.data.seq_len // 1024}k and "
          f"{cont.batch_size * cont.seq_len * cont.steps / 1e6:.1f}M per "
          f"{cont.seq_len // 1024}k continuation, against MiniCPM4's 0.5-8B models, trillions of pretraining tokens and a "
          "5B-token long-context stage evaluated at 32k-128k: the same comparison, not the "
          "same model")
  return {
      "experiment": "longctx_ablation (issue 4; issue 3's short-to-long curves)",
      "scale": scale, "scale_note": note,
      "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "command": f"python -m experiments.longctx_ablation {argv}".strip(),
      "phase_commands": [pre_cmd] + [
          f"python -m experiments.pretrain --config=configs/longctx_ablation.py:{scale},{m} "
          f"--config.workdir={os.path.join(a.root, m)} "
          f"--config.train.init_from={config.workdir}" for m in a.methods],
      "params": num_params(config), "model": config.model.to_dict(),
      "pretrain": {"seq_len": int(config.data.seq_len), "steps": int(config.train.steps),
                   "batch_size": int(config.train.batch_size), "lr": config.train.lr,
                   "tokens_per_step": tokens_per_step(config),
                   "tokens": tokens_per_step(config) * int(config.train.steps)},
      "retrieval_mix": config.retrieval_mix.to_dict(),
      "continuation": {**cont.to_dict(), "tokens_per_step": int(cont.batch_size * cont.seq_len),
                       "tokens": int(cont.batch_size * cont.seq_len * cont.steps)},
      "sparse": sparse_settings(config), "eval": config.ablation.eval.to_dict(),
      "methods": {}, "phase_seconds": {"startup": None}, "errors": {}}


# ---- main -----------------------------------------------------------------------------------

def run(config, out_dir: str) -> bool:
  """All phases; returns True when every phase succeeded."""
  a = config.ablation
  report = new_report(config)
  report["phase_seconds"]["startup"] = round(time.time() - _START, 1)
  say(f"device {report['device']} ({report['backend']}), jax {report['jax_version']}, workdir "
      f"{a.root}, out_dir {out_dir}")
  sp = report["sparse"]
  say(f"InfLLM-V2: {sp['topk']} blocks of {sp['block_size']} = {sp['visible_tokens']} visible "
      f"tokens ({100 * sp['visible_fraction_at_continuation_len']:.1f}% of "
      f"{a.continuation.seq_len}); dense_len {sp['dense_len']}; evaluated lengths running dense: "
      f"{sp['dense_eval_lengths'] or 'none'}")
  write_report(report, out_dir)

  start = time.time()
  try:
    pre = train_phase(config)
  except Exception:  # nothing can follow without the pretrained weights
    report["errors"]["pretrain"] = traceback.format_exc()[-3000:]
    write_report(report, out_dir)
    raise
  report["params"] = pre["info"]["params"]
  report["pretrain"].update(pre["info"])
  report["phase_seconds"]["pretrain"] = round(time.time() - start, 1)
  ev = pre["info"]["final_eval"] or {}
  say(f"pretrain: {pre['info']['params'] / 1e6:.1f}M params, {pre['info']['steps']} steps, "
      f"validation loss {_fmt(ev.get('loss'), pct=False)}, "
      f"{pre['info']['tokens_per_s'] or 0:,.0f} tokens/s"
      f"{' (reused)' if pre['info']['reused_finished_run'] else ''} "
      f"({report['phase_seconds']['pretrain']} s)")
  write_report(report, out_dir)
  del pre

  trained = {}
  for method in a.methods:
    start = time.time()
    cfg = ablation_config.continuation_config(config, method)
    try:
      trained[method] = train_phase(cfg)
      info = trained[method]["info"]
      report["methods"][method] = {"train": info}
      first = _fmt((info["initial_eval"] or {}).get("loss"), pct=False)
      last = _fmt((info["final_eval"] or {}).get("loss"), pct=False)
      say(f"continue {method}: validation loss at the switch {first} -> {last} after "
          f"{info['steps']} steps, {info['tokens_per_s'] or 0:,.0f} tokens/s"
          f"{' (reused)' if info['reused_finished_run'] else ''} ({time.time() - start:.1f} s)")
    except Exception as e:  # the other methods still run and report
      traceback.print_exc()
      report["errors"][f"continue_{method}"] = traceback.format_exc()[-3000:]
      report["methods"][method] = {"error": f"{type(e).__name__}: {e}"[:500]}
    report["phase_seconds"][f"continue_{method}"] = round(time.time() - start, 1)
    merge_logs(config, a.methods, os.path.join(out_dir, CSV_NAME))
    write_report(report, out_dir)
  plots = draw_plots(out_dir, os.path.join(a.root, "plots"))

  def evaluate_into(name, model, tokenizer):
    """eval_phase into report["methods"][name]; a failure is recorded, the others still run."""
    start = time.time()
    try:
      report["methods"][name].update(eval_phase(name, model, tokenizer, config))
    except Exception as e:
      traceback.print_exc()
      report["errors"][f"eval_{name}"] = traceback.format_exc()[-3000:]
      report["methods"][name]["error"] = f"{type(e).__name__}: {e}"[:500]
    report["phase_seconds"][f"eval_{name}"] = round(time.time() - start, 1)
    write_report(report, out_dir)
    return draw_plots(out_dir, os.path.join(a.root, "plots"))  # each time: a cut run keeps it

  for method, t in trained.items():
    plots = evaluate_into(method, t["model"], t["tokenizer"])
  if a.eval.training_free and "dense" in trained and "infllmv2" in a.methods:
    report["methods"][TRAINING_FREE] = {"weights": "dense continuation", "attention": "infllmv2"}
    plots = evaluate_into(TRAINING_FREE, with_config(
        trained["dense"]["model"], attention="infllmv2",
        attention_options=tuple(sorted(a.sparse.to_dict().items()))), trained["dense"]["tokenizer"])

  s = report["summary"]
  say("summary (avg harness score, long ppl by length):")
  for method, r in report["methods"].items():
    if "avg_score" in r:
      print(f"  {method:15s} avg {r['avg_score']:.3f}  beyond-window "
            f"{_fmt(r['retrieval']['beyond'])}%  ppl "
            + ", ".join(f"{l}: {v:.3f}" for l, v in r["long_ppl"].items()), flush=True)
    else:
      print(f"  {method:15s} FAILED: {r.get('error')}", flush=True)
  if s.get("infllmv2_over_dense_avg_score") is not None:
    print(f"  infllmv2 / dense avg score: {s['infllmv2_over_dense_avg_score']:.3f} "
          f"(>= {MIN_SCORE_RATIO}: {s['met_score_ratio']})", flush=True)
  if "retrieval_beyond_window" in s:
    r = s["retrieval_beyond_window"]
    print(f"  retrieval beyond the {sp['window']}-token window: infllmv2 {_fmt(r['infllmv2'])}%, "
          f"sliding_window {_fmt(r['sliding_window'])}% (met: {s['met_beyond_window']})",
          flush=True)
  files = [JSON_NAME, MD_NAME, CSV_NAME] + plots
  say(f"wrote {', '.join(os.path.join(out_dir, f) for f in files)}; phase seconds "
      f"{report['phase_seconds']}")
  return not report["errors"]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = build_config()
  out_dir = _OUT_DIR.value or os.path.join(config.ablation.root, "results")
  os.makedirs(out_dir, exist_ok=True)
  if _REPLOT.value:  # the summary and markdown too, from the JSON (e.g. after adding a statistic)
    with open(os.path.join(out_dir, JSON_NAME), encoding="utf-8") as f:
      report = json.load(f)
    report["summary"] = summarize(report)
    with open(os.path.join(out_dir, JSON_NAME), "w", encoding="utf-8") as f:
      json.dump(_jsonable(report), f, indent=1)
    with open(os.path.join(out_dir, MD_NAME), "w", encoding="utf-8") as f:
      f.write(markdown(_jsonable(report)))
    say("redrew " + ", ".join(draw_plots(out_dir, os.path.join(out_dir, ".plots_scratch"))))
    shutil.rmtree(os.path.join(out_dir, ".plots_scratch"), ignore_errors=True)
    return
  if not run(config, out_dir):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
