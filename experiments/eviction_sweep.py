"""KV-cache eviction sweep (issue 6): every scorer x compression ratio on the long-context tasks.

  python -m experiments.eviction_sweep --workdir=runs/longctx_ablation_gpu/dense \
      --retaining_heads=runs/locret_heads/retaining_heads --max_seq_len=33024 \
      --lengths=16384,32768 --batch_size=4 --out=experiments/results/eviction_sweep

For each length L, ratio r and scorer, generation runs with chunked prefill (--eviction_chunk_size)
that evicts every KV head to budget = L / r entries after every chunk; the full-cache baseline
runs the same chunked prefill without eviction (or `generate` with --full_cache=generate).
Stabilizers: --eviction_stabilizers, or --stabilizer_fraction of the budget when unset. Takes the
task, length, model and generation flags of experiments.eval_longctx (its perplexity and
--eviction_scorer/--eviction_budget/--eviction_compression flags do not apply here).

Writes <out>.json ({"full_cache_score", "methods": {scorer: {ratio: {"score", "peak_kv_bytes",
...}}}, per-task scores, settings, skipped scorers}), <out>.md (tables) and <out>.png (accuracy
vs compression per task). peak_kv_bytes: the cache arrays one generation call allocates (the
whole batch of --batch_size, the longest length). The JSON is rewritten after every entry and a
rerun with the same settings and --out (--resume, the default) runs only the missing entries, so
a sweep longer than one command can be split (e.g. --scorers=locret,snapkv, then the rest).
"""
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import eval_longctx, eviction_flags
from sparsejax.eval import evaluate, paired_bootstrap
from sparsejax.inference.eviction import EvictingGenerator
from sparsejax.inference.eviction_cache import cache_bytes
from sparsejax.inference.generate import generate
from sparsejax.inference.scorers import SCORERS
from sparsejax.layers.kv_cache import KVCache
from sparsejax.train.checkpoint import load_model

FLAGS = flags.FLAGS
SCORER_ORDER = ("locret", "snapkv", "h2o", "streaming", "random")
_SCORERS = flags.DEFINE_list("scorers", list(SCORER_ORDER), f"Scorers, from {sorted(SCORERS)}.")
_RATIOS = flags.DEFINE_list("ratios", ["4", "8", "16"], "Compression ratios: budget = length / r.")
_STAB_FRACTION = flags.DEFINE_float("stabilizer_fraction", 0.25,
                                    "Stabilizers as a fraction of the budget when "
                                    "--eviction_stabilizers is unset.")
_FULL_CACHE = flags.DEFINE_enum("full_cache", "chunked", ["chunked", "generate"],
                                "The full-cache baseline: the same chunked prefill without "
                                "eviction (memory O(chunk x length)) or sparsejax `generate` "
                                "(one prefill, memory O(length^2) in the jnp attention).")
_RESUME = flags.DEFINE_bool("resume", True, "Keep the entries an earlier run with the same "
                            "settings wrote to --out and run only the missing ones (the JSON is "
                            "written after every scorer x ratio).")
FLAGS.set_default("lengths", ["16384"])
FLAGS.set_default("samples", 1)


class _RecordingGenerate:
  """`generate` that records the bytes of the KVCache it allocates (the full-cache baseline)."""

  def __init__(self):
    self.peak_kv_bytes = 0

  def __call__(self, model, prompts, *, max_new_tokens, eos_id, pad_to):
    shapes = jax.eval_shape(lambda: KVCache.for_model(model.config, batch=len(prompts),
                                                      capacity=pad_to + max_new_tokens))
    self.peak_kv_bytes = max(self.peak_kv_bytes, cache_bytes(shapes))
    return generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_to=pad_to)


def _evaluate(model, tok, length: int, generate_fn) -> dict:
  return evaluate(model, tok, FLAGS.tasks, [length], [float(d) for d in FLAGS.depths],
                  FLAGS.samples, FLAGS.seed, FLAGS.max_new_tokens, FLAGS.batch_size,
                  haystack=FLAGS.haystack, corpus=FLAGS.corpus, log=logging.info,
                  generate_fn=generate_fn)


def _summarise(per_length: dict[int, dict], peak: int, extra: dict | None = None) -> dict:
  """Per-length evaluate() results -> score (mean over lengths and tasks), per task, per length,
  and each prompt's score (`samples`, what the paired intervals resample)."""
  tasks = list(next(iter(per_length.values()))["tasks"])
  by_task = {t: float(np.mean([r["tasks"][t][l] for l, r in per_length.items()])) for t in tasks}
  by_length = {str(l): r["avg_score"] for l, r in per_length.items()}
  samples = [{k: x[k] for k in ("task", "length", "depth", "sample", "score")}
             for r in per_length.values() for x in r["samples"]]
  return {"score": float(np.mean(list(by_length.values()))), "peak_kv_bytes": int(peak),
          "tasks": by_task, "by_length": by_length, "samples": samples, **(extra or {})}


def _paired_lines(data: dict, ratios: list[str]) -> list[str]:
  """Markdown rows of paired 95% intervals over the prompts: each scorer against the full cache,
  and Locret against SnapKV and H2O (the paper's comparison). Entries of runs that kept no
  per-prompt scores (before 2026-12-06) are left out."""
  full, methods = data["full_cache"], data["methods"]
  has = lambda e: e is not None and "samples" in e
  pct = lambda v: f"{100 * v:+.1f}"
  rows = []

  def row(name_a, a, name_b, b, ratio):
    p = paired_bootstrap(a["samples"], b["samples"])
    rows.append(f"| {name_b} - {name_a} | {ratio}x | {pct(p['diff'])} | "
                f"[{pct(p['diff_ci95'][0])}, {pct(p['diff_ci95'][1])}] | {p['n']} |")

  for scorer, by_ratio in methods.items():
    for r in ratios:
      if has(full) and has(by_ratio.get(r)):
        row("full cache", full, scorer, by_ratio[r], r)
  locret = methods.get("locret", {})
  for other in ("snapkv", "h2o"):
    for r in ratios:
      if has(locret.get(r)) and has(methods.get(other, {}).get(r)):
        row(other, methods[other][r], "locret", locret[r], r)
  if not rows:
    return []
  return ["", "## Paired differences (points, 95% interval over the prompts)", "",
          "Resampling the prompts within each task (`sparsejax.eval.paired_bootstrap`); this "
          "covers the prompts drawn, not the run-to-run variance of training.", "",
          "| difference | ratio | points | 95% interval | prompts |", "|---|---|---|---|---|"] + rows


def _plot(data: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(data["full_cache"]["tasks"]) + ["average"]
  cols = min(4, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
  for ax, task in zip(axes.flat, tasks):
    pick = (lambda e: e["score"]) if task == "average" else (lambda e, t=task: e["tasks"][t])
    for scorer, by_ratio in data["methods"].items():
      ratios = sorted(by_ratio, key=float)
      ax.plot([float(r) for r in ratios], [pick(by_ratio[r]) for r in ratios], marker="o",
              label=scorer)
    ax.axhline(pick(data["full_cache"]), color="k", ls="--", lw=1, label="full cache")
    ax.set_xscale("log", base=2)
    ratios = sorted({float(r) for m in data["methods"].values() for r in m})
    ax.set_xticks(ratios, [f"{r:g}x" for r in ratios])
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(task)
    ax.set_xlabel("KV compression")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(f"accuracy vs KV compression ({', '.join(map(str, data['settings']['lengths']))}"
               " tokens)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _markdown(data: dict) -> str:
  s, full, methods = data["settings"], data["full_cache"], data["methods"]
  ratios = sorted({r for m in methods.values() for r in m}, key=float)
  pct = lambda v: f"{100 * v:.1f}"
  mib = lambda b: f"{b / 2 ** 20:.3g}"
  lines = [
      "# KV-cache eviction sweep", "",
      f"Checkpoint `{s['workdir']}` step {s['step']}; lengths {s['lengths']}; tasks "
      f"{', '.join(s['tasks'])}; {s['samples']} sample(s) per cell; chunk {s['chunk_size']}, "
      f"sinks {s['n_sinks']}, stabilizers {s['stabilizers']}, positions {s['position_mode']}, "
      f"local tail {s['local_len']}, decoding '{s['decode_mode']}'; full cache: "
      f"{s['full_cache']}.", "", f"Command: `{data['command']}`", "",
      "## Average score (%) vs compression", "",
      "| scorer | " + " | ".join(f"{r}x" for r in ratios) + " |",
      "|---|" + "---|" * len(ratios),
      f"| full cache | {pct(full['score'])} (1x) |" + " |" * (len(ratios) - 1)]
  for scorer, by_ratio in methods.items():
    lines.append(f"| {scorer} | " + " | ".join(
        pct(by_ratio[r]["score"]) if r in by_ratio else "-" for r in ratios) + " |")
  tasks = list(full["tasks"])
  lines += ["", "## Per task (%)", "", "| scorer | ratio | " + " | ".join(tasks) + " | avg |",
            "|---|---|" + "---|" * (len(tasks) + 1),
            "| full cache | 1x | " + " | ".join(pct(full["tasks"][t]) for t in tasks)
            + f" | {pct(full['score'])} |"]
  for scorer, by_ratio in methods.items():
    for r in ratios:
      if r in by_ratio:
        e = by_ratio[r]
        lines.append(f"| {scorer} | {r}x | " + " | ".join(pct(e["tasks"][t]) for t in tasks)
                     + f" | {pct(e['score'])} |")
  lines += ["", f"## Peak KV cache (MiB; all cache arrays of one call: batch {s['batch_size']}, "
            f"longest length)", "", "| scorer | " + " | ".join(f"{r}x" for r in ratios) + " |",
            "|---|" + "---|" * len(ratios),
            f"| full cache | {mib(full['peak_kv_bytes'])} (1x) |" + " |" * (len(ratios) - 1)]
  for scorer, by_ratio in methods.items():
    lines.append(f"| {scorer} | " + " | ".join(
        mib(by_ratio[r]["peak_kv_bytes"]) if r in by_ratio else "-" for r in ratios) + " |")
  lines += _paired_lines(data, ratios)
  notes = [f"- {k}: {v}" for k, v in data["skipped"].items()] + [f"- {n}" for n in data["notes"]]
  if notes:
    lines += ["", "## Notes", ""] + notes
  return "\n".join(lines) + "\n"


def _settings(meta, model, lengths) -> dict:
  """What a run measured under; a resumed run reuses results only when these match."""
  return {
      "workdir": FLAGS.workdir, "step": meta["step"], "model": model.config.to_dict(),
      "device": jax.devices()[0].device_kind, "tasks": list(FLAGS.tasks), "lengths": lengths,
      "depths": [float(d) for d in FLAGS.depths], "samples": FLAGS.samples,
      "haystack": FLAGS.haystack, "corpus": FLAGS.corpus, "max_new_tokens": FLAGS.max_new_tokens,
      "batch_size": FLAGS.batch_size, "seed": FLAGS.seed,
      "chunk_size": eviction_flags.CHUNK_SIZE.value,
      "stabilizers": (FLAGS.eviction_stabilizers if FLAGS.eviction_stabilizers is not None
                      else f"{_STAB_FRACTION.value:g} x budget"),
      "n_sinks": eviction_flags.SINKS.value, "position_mode": eviction_flags.POSITION_MODE.value,
      "local_len": eviction_flags.LOCAL_LEN.value,
      "decode_mode": eviction_flags.DECODE_MODE.value,
      "snapkv": {"window": eviction_flags.SNAPKV_WINDOW.value,
                 "kernel": eviction_flags.SNAPKV_KERNEL.value,
                 "pooling": eviction_flags.SNAPKV_POOLING.value},
      "retaining_heads": eviction_flags.RETAINING_HEADS.value,
      "init_retaining_heads": eviction_flags.INIT_RETAINING_HEADS.value,
      "full_cache": _FULL_CACHE.value}


def _previous(path: str, settings: dict) -> dict | None:
  """The results of an earlier run into the same --out with the same settings, or None."""
  if not _RESUME.value or not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  same = {k: v for k, v in old.get("settings", {}).items() if k in settings} == json.loads(
      json.dumps(settings))
  if not same:
    print(f"{path} holds results of other settings: starting over", flush=True)
  return old if same else None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  for name in ("eviction_scorer", "eviction_budget", "eviction_compression"):
    if FLAGS[name].present:
      raise app.UsageError(f"--{name} is eval_longctx's; the sweep takes --scorers and --ratios")
  scorers = list(_SCORERS.value)
  for s in scorers:
    if s not in SCORERS:
      raise app.UsageError(f"--scorers: unknown scorer {s!r}; known: {sorted(SCORERS)}")
  try:
    ratios = [float(r) for r in _RATIOS.value]
  except ValueError as e:
    raise app.UsageError(f"--ratios must be numbers, got {_RATIOS.value}") from e
  if not ratios or min(ratios) < 1:
    raise app.UsageError(f"--ratios must be numbers >= 1, got {_RATIOS.value}")
  if not 0 <= _STAB_FRACTION.value < 1:
    raise app.UsageError(f"--stabilizer_fraction must be in [0, 1), got {_STAB_FRACTION.value}")
  lengths = [int(x) for x in FLAGS.lengths]
  model, tok, meta = load_model(FLAGS.workdir, FLAGS.step)
  model = eval_longctx.with_attention(model, FLAGS.attention, FLAGS.attention_options,
                                      FLAGS.max_seq_len)
  heads, skipped, notes = None, {}, []
  if "locret" in scorers:
    heads, note = eviction_flags.load_heads(model)
    if heads is None:
      skipped["locret"] = f"skipped: {note}"
      scorers.remove("locret")
    else:
      notes.append(f"locret: {note}")

  out = FLAGS.out or os.path.join(FLAGS.workdir, "eviction_sweep")  # results/ only when asked
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  settings = _settings(meta, model, lengths)
  old = _previous(out + ".json", settings) or {}
  full_entry, methods = old.get("full_cache"), old.get("methods", {})
  start = time.time()

  def save():
    """Writes the JSON (and, once the full cache is in, the table and plot) after every entry,
    so a run cut short keeps what it measured and --resume continues from it."""
    order = [s for s in SCORER_ORDER if s in methods] + [s for s in methods
                                                         if s not in SCORER_ORDER]
    data = {"full_cache_score": None if full_entry is None else full_entry["score"],
            "full_cache": full_entry,
            "methods": {s: dict(sorted(methods[s].items(), key=lambda kv: float(kv[0])))
                        for s in order},
            "skipped": skipped, "notes": notes,
            "command": "python -m experiments.eviction_sweep " + " ".join(sys.argv[1:]),
            "settings": settings | {"seconds_this_run": round(time.time() - start, 1)}}
    with open(out + ".json", "w", encoding="utf-8") as f:
      json.dump(data, f, indent=1)
    if full_entry is not None:
      with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(_markdown(data))
      _plot(data, out + ".png")
    return data

  if full_entry is None:
    # The full cache: compression 1 keeps every entry; decoding must not evict either.
    if _FULL_CACHE.value == "chunked":
      full_gen = EvictingGenerator(dataclasses.replace(
          eviction_flags.policy("streaming", compression=1.0, n_stabilizers=0),
          decode_mode="grow"))
    else:
      full_gen = _RecordingGenerate()
    full = {l: _evaluate(model, tok, l, full_gen) for l in lengths}
    full_entry = _summarise(full, full_gen.peak_kv_bytes, {"impl": _FULL_CACHE.value})
    save()
  print(f"full cache: score {full_entry['score']:.3f}, peak KV {full_entry['peak_kv_bytes']} "
        "bytes", flush=True)

  for scorer in scorers:
    for ratio in ratios:
      key = f"{ratio:g}"
      if key in methods.get(scorer, {}):
        print(f"{scorer} {key}x: kept from the previous run", flush=True)
        continue
      per_length, budgets, stabs, peak = {}, {}, {}, 0
      for length in lengths:
        budget = max(1, int(length // ratio))
        stab = (FLAGS.eviction_stabilizers if FLAGS.eviction_stabilizers is not None
                else int(_STAB_FRACTION.value * budget))
        gen = EvictingGenerator(eviction_flags.policy(scorer, budget=budget, n_stabilizers=stab),
                                heads if scorer == "locret" else None)
        per_length[length] = _evaluate(model, tok, length, gen)
        budgets[str(length)], stabs[str(length)] = budget, stab
        peak = max(peak, gen.peak_kv_bytes)
      entry = _summarise(per_length, peak, {"budget": budgets, "n_stabilizers": stabs})
      methods.setdefault(scorer, {})[key] = entry
      save()
      print(f"{scorer} {key}x: score {entry['score']:.3f}, peak KV {peak} bytes "
            f"({time.time() - start:.0f} s)", flush=True)

  print(_markdown(save()), end="")
  print(f"wrote {out}.json, {out}.md, {out}.png")


if __name__ == "__main__":
  app.run(main)
