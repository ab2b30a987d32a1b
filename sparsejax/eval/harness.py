"""Runs the synthetic long-context tasks through batched greedy generation, scores and reports.

Scores follow RULER's `string_match_all`: the fraction of the expected answers found in the
completion. Results are a nested dict {task: {length: {depth: score}}} with per-task/length and
overall averages; `write_results` turns them into JSON, a markdown table and plots, and
`compare_methods` puts several runs (e.g. dense vs InfLLM-V2 vs sliding window) side by side.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from sparsejax.eval.tasks import DEPTH_TASKS, TASKS, make_sample
from sparsejax.inference.generate import generate


def score(prediction: str, answers: Sequence[str]) -> float:
  """Fraction of `answers` that occur in `prediction` as whole tokens (case-insensitive).

  RULER matches plain substrings; here an answer must not be glued to further letters or digits,
  so "123456" does not count as the pass key "12345" and "ABCDEF" not as the variable "ABCDE".
  """
  if isinstance(answers, str) or not answers:
    raise ValueError(f"answers must be a non-empty sequence of strings, got answers={answers!r}")
  hits = 0
  for ans in answers:
    pattern = r"(?<![0-9A-Za-z])" + re.escape(ans) + r"(?![0-9A-Za-z])"
    hits += re.search(pattern, prediction, flags=re.IGNORECASE) is not None
  return hits / len(answers)


def _check_list(name: str, values, kind) -> list:
  values = list(values)
  if not values:
    raise ValueError(f"{name} must not be empty")
  for v in values:
    if not isinstance(v, kind) or isinstance(v, bool):
      raise ValueError(f"{name} must hold {kind}, got {name}={values!r}")
  return values




def evaluate(model, tokenizer, tasks: Iterable[str], lengths: Iterable[int],
             depths: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0), samples_per_cell: int = 1,
             seed: int = 0, max_new_tokens: int = 64, batch_size: int = 8, *,
             haystack: str = "noise", corpus: str = "stdlib", log=None,
             generate_fn=None) -> dict:
  """Scores greedy completions of every (task, length, depth, sample) cell.

  `generate_fn(model, prompts, *, max_new_tokens, eos_id, pad_to) -> new tokens per prompt`
  replaces `sparsejax.inference.generate` (the default), e.g. a KV-eviction policy's
  `sparsejax.inference.eviction.EvictingGenerator`.

  Word-list tasks have no needle, so they run at a single depth (0.0) with
  `samples_per_cell * len(depths)` samples, the same number of prompts as a needle task.
  Returns {"cells": {task: {length: {depth: score}}}, "tasks": {task: {length: mean}},
  "task_avg": {task: mean}, "length_avg": {length: mean}, "avg_score": mean of the task averages,
  "samples": [one record per prompt: answers, prediction, score]}.
  """
  tasks = _check_list("tasks", tasks, str)
  for t in tasks:
    if t not in TASKS:
      raise ValueError(f"tasks: unknown task {t!r}; known: {sorted(TASKS)}")
  lengths = _check_list("lengths", lengths, (int, np.integer))
  depths = [float(d) for d in _check_list("depths", depths, (int, float))]
  for name, v in (("samples_per_cell", samples_per_cell), ("max_new_tokens", max_new_tokens),
                  ("batch_size", batch_size)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
  cfg = model.config

  records = []
  for task in tasks:
    cell_depths = depths if task in DEPTH_TASKS else [0.0]
    n = samples_per_cell if task in DEPTH_TASKS else samples_per_cell * len(depths)
    for length in lengths:
      for depth in cell_depths:
        for i in range(n):
          s = make_sample(task, tokenizer, int(length), depth, seed=seed * 1_000_003 + i,
                          haystack=haystack, corpus=corpus)
          records.append({"task": task, "length": int(length), "depth": depth, "sample": i,
                          "answers": list(s.answers),
                          "ids": [tokenizer.bos_id] + tokenizer.encode(s.prompt)})

  for length in lengths:  # one compiled shape per length: batch_size x width
    group = [r for r in records if r["length"] == int(length)]
    width = max(len(r["ids"]) for r in group)
    if width + max_new_tokens > cfg.max_seq_len:
      raise ValueError(
          f"lengths: a {length}-token prompt ({width} tokens with bos and tokenizer slack) + "
          f"max_new_tokens={max_new_tokens} exceeds the model's max_seq_len={cfg.max_seq_len}")
    for start in range(0, len(group), batch_size):
      chunk = group[start:start + batch_size]
      prompts = [r["ids"] for r in chunk]
      prompts += [prompts[-1]] * (batch_size - len(prompts))  # keep the batch shape fixed
      outs = (generate if generate_fn is None else generate_fn)(
          model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_to=width)
      for r, out in zip(chunk, outs):
        r["prediction"] = tokenizer.decode(out)
        r["score"] = score(r["prediction"], r["answers"])
      if log is not None:
        log(f"length {length}: {min(start + batch_size, len(group))}/{len(group)} prompts")

  cells: dict = {}
  for r in records:
    cells.setdefault(r["task"], {}).setdefault(r["length"], {}).setdefault(r["depth"], []).append(
        r["score"])
  cells = {t: {l: {d: float(np.mean(v)) for d, v in by_d.items()} for l, by_d in by_l.items()}
           for t, by_l in cells.items()}
  per_task = {t: {l: float(np.mean(list(by_d.values()))) for l, by_d in by_l.items()}
              for t, by_l in cells.items()}
  task_avg = {t: float(np.mean(list(by_l.values()))) for t, by_l in per_task.items()}
  length_avg = {int(l): float(np.mean([per_task[t][int(l)] for t in tasks])) for l in lengths}
  for r in records:
    del r["ids"]
  return {"cells": cells, "tasks": per_task, "task_avg": task_avg, "length_avg": length_avg,
          "avg_score": float(np.mean(list(task_avg.values()))), "samples": records}


# ---------------------------------------------------------------------------------------------
# Reports.

def paired_bootstrap(samples_a: Sequence[dict], samples_b: Sequence[dict], *, reps: int = 2000,
                     seed: int = 0) -> dict:
  """How sure is "method b scores x against method a"? Both methods answered the same prompts
  (the records of `evaluate`, matched on task, length, depth and sample); resampling the prompts
  with replacement, within each task, gives a 95% interval for b - a and b / a of the average
  score (the mean of the task means, as `evaluate`'s avg_score). It covers the prompts drawn, not
  the run-to-run variance of training the models.

  Returns {"n", "a", "b", "diff", "diff_ci95": [lo, hi], "ratio", "ratio_ci95": [lo, hi]}
  (ratio None where a's average is 0)."""
  key = lambda r: (r["task"], int(r["length"]), float(r["depth"]), int(r["sample"]))
  a = {key(r): float(r["score"]) for r in samples_a}
  b = {key(r): float(r["score"]) for r in samples_b}
  if set(a) != set(b) or not a:
    raise ValueError(f"paired_bootstrap: the two runs must score the same prompts; "
                     f"{len(set(a) ^ set(b))} of {len(set(a) | set(b))} differ")
  tasks = sorted({k[0] for k in a})
  per_task = [np.array([[a[k], b[k]] for k in sorted(a) if k[0] == t]) for t in tasks]

  def averages(draws):  # draws: one index array per task -> (avg a, avg b)
    means = np.stack([scores[d].mean(axis=-2) for scores, d in zip(per_task, draws)])
    return means.mean(axis=0)

  rng = np.random.default_rng(seed)
  point = averages([np.arange(len(x)) for x in per_task])
  boot = np.stack([averages([rng.integers(0, len(x), len(x)) for x in per_task])
                   for _ in range(reps)])                                       # [reps, 2]
  interval = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
  ratio = None if point[0] == 0 else float(point[1] / point[0])
  ratios = boot[:, 1] / np.where(boot[:, 0] > 0, boot[:, 0], np.nan)
  return {"n": len(a), "a": float(point[0]), "b": float(point[1]),
          "diff": float(point[1] - point[0]), "diff_ci95": interval(boot[:, 1] - boot[:, 0]),
          "ratio": ratio,
          "ratio_ci95": None if ratio is None else interval(ratios[np.isfinite(ratios)])}


def _jsonable(obj):
  """Dict keys to strings (lengths, depths) and numpy scalars to Python ones."""
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None  # strict JSON has no NaN / inf
  return obj


def _sorted_keys(d: dict) -> list:
  return sorted(d, key=float)


def markdown_table(results: dict) -> str:
  """Rows: tasks (+ average); columns: lengths; cells: mean score in percent."""
  per_task = results["tasks"]
  lengths = sorted({float(l) for by_l in per_task.values() for l in by_l})
  lookup = lambda by_l, l: next((v for k, v in by_l.items() if float(k) == l), None)
  fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"
  head = ["task"] + [str(int(l)) for l in lengths] + ["avg"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for task, by_l in per_task.items():
    vals = [lookup(by_l, l) for l in lengths]
    lines.append("| " + " | ".join([task] + [fmt(v) for v in vals]
                                   + [fmt(results["task_avg"][task])]) + " |")
  avg = [lookup(results["length_avg"], l) for l in lengths]
  lines.append("| " + " | ".join(["**average**"] + [fmt(v) for v in avg]
                                 + [fmt(results["avg_score"])]) + " |")
  ppl = results.get("long_ppl")
  if ppl:
    lines += ["", "| length | long perplexity |", "|---|---|"]
    lines += [f"| {int(float(l))} | {ppl[l]:.3f} |" for l in _sorted_keys(ppl)]
  return "\n".join(lines) + "\n"


def write_results(results: dict, out_stem: str) -> list[str]:
  """Writes `out_stem`.json, .md, a depth x length heat-map PNG per needle task and a plot of
  accuracy vs length (one line per task and the average). Returns the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for key in ("cells", "tasks", "task_avg", "length_avg", "avg_score"):
    if key not in results:
      raise ValueError(f"results has no {key!r}; pass the dict `evaluate` returned")
  os.makedirs(os.path.dirname(os.path.abspath(out_stem)), exist_ok=True)
  method = results.get("method", "model")
  paths = [out_stem + ".json", out_stem + ".md"]
  with open(paths[0], "w", encoding="utf-8") as f:
    json.dump(_jsonable(results), f, indent=1)
  with open(paths[1], "w", encoding="utf-8") as f:
    f.write(f"# Long-context eval: {method}\n\n" + markdown_table(results))

  for task, by_l in results["cells"].items():
    if task not in DEPTH_TASKS:
      continue
    lengths = _sorted_keys(by_l)
    depths = sorted({float(d) for by_d in by_l.values() for d in by_d})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for j, l in enumerate(lengths):
      for d, v in by_l[l].items():
        grid[depths.index(float(d)), j] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(int(float(l))) for l in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{task} ({method})")
    for (i, j), v in np.ndenumerate(grid):
      if np.isfinite(v):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = f"{out_stem}_heatmap_{task}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(6, 4))
  for task, by_l in results["tasks"].items():
    ls = _sorted_keys(by_l)
    ax.plot([float(l) for l in ls], [by_l[l] for l in ls], marker=".", alpha=0.6, label=task)
  ls = _sorted_keys(results["length_avg"])
  ax.plot([float(l) for l in ls], [results["length_avg"][l] for l in ls], "k-o", lw=2,
          label=f"average ({method})")
  _length_axes(ax, f"accuracy vs length ({method})")
  fig.tight_layout()
  path = f"{out_stem}_vs_length.png"
  fig.savefig(path, dpi=100)
  plt.close(fig)
  paths.append(path)
  return paths


def _length_axes(ax, title: str) -> None:
  ax.set_xscale("log", base=2)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("score")
  ax.set_title(title)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)


def compare_methods(result_paths: Sequence[str], out_stem: str) -> list[str]:
  """One table and one accuracy-vs-length plot (a line per method) from several JSON files that
  `write_results` wrote, e.g. the dense / InfLLM-V2 / sliding-window runs of one checkpoint."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not result_paths:
    raise ValueError("result_paths must name at least one results JSON")
  runs = []
  for p in result_paths:
    with open(p, encoding="utf-8") as f:
      runs.append(json.load(f))
  lengths = sorted({int(float(l)) for r in runs for l in r["length_avg"]})
  head = ["method"] + [str(l) for l in lengths] + ["avg"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in runs:
    by_l = {int(float(k)): v for k, v in r["length_avg"].items()}
    cells = [f"{100 * by_l[l]:.1f}" if l in by_l else "-" for l in lengths]
    lines.append("| " + " | ".join([r.get("method", "?")] + cells
                                   + [f"{100 * r['avg_score']:.1f}"]) + " |")
    ls = sorted(by_l)
    ax.plot(ls, [by_l[l] for l in ls], marker="o", label=r.get("method", "?"))
  _length_axes(ax, "average score vs length")
  fig.tight_layout()
  paths = [out_stem + ".md", out_stem + ".png"]
  os.makedirs(os.path.dirname(os.path.abspath(out_stem)), exist_ok=True)
  fig.savefig(paths[1], dpi=100)
  plt.close(fig)
  with open(paths[0], "w", encoding="utf-8") as f:
    f.write("# Long-context eval: methods compared\n\n" + "\n".join(lines) + "\n")
  return paths
