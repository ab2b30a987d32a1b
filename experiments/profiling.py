"""Where a jitted call's device time goes: per-kernel totals from a jax.profiler trace.

  table = kernel_times(fn, *args, reps=5)     # GPU kernels, per call
  print(markdown(table, "decode step, 128k"))

Wall-clock medians (experiments/timing.py) say how long a call takes; this says which kernels
take it: every complete event on the device's streams of the trace, grouped by name (XLA fusions,
cuBLAS/cuDNN kernels and Pallas kernels keep their names), summed and divided by the repetitions.
The sum can exceed the call's wall time (kernels on several streams overlap) or fall short of it
(launch gaps, host work): `busy_fraction` in `summary` is the kernels' sum over the wall time.
Each row's `idle_us` is the time its stream sat idle just before the kernel began (per call):
where launch gaps fall, e.g. a kernel whose launch waits on the host.
"""
import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax

GPU_PROCESS = "/device:GPU"


def load_trace_events(log_dir: str) -> list[dict]:
  """The trace events of the one profile written under log_dir."""
  paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
  if len(paths) != 1:
    raise RuntimeError(f"expected one *.trace.json.gz under {log_dir}, found {paths}")
  with gzip.open(paths[0], "rt") as f:
    return json.load(f)["traceEvents"]


def summarize(events: list[dict], *, reps: int, process_prefix: str = GPU_PROCESS,
              thread_contains: str = "") -> list[dict]:
  """Complete ('X') events of the processes whose name starts with process_prefix (and threads
  whose name contains thread_contains), grouped by event name: rows of name, us (per call),
  count (per call), share (of the rows' total) and idle_us (per call: the time the event's
  thread was idle just before it, from the end of that thread's previous event; the first
  event of each thread adds nothing), largest first."""
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps}")
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  total_us, count, idle_us = (collections.Counter() for _ in range(3))
  thread_end = {}  # (pid, tid) -> end of its latest event so far
  kept = [e for e in events if e.get("ph") == "X"
          and processes.get(e["pid"], "").startswith(process_prefix)
          and thread_contains in threads.get((e["pid"], e.get("tid")), "")]
  for e in sorted(kept, key=lambda e: float(e["ts"])):
    start, dur = float(e["ts"]), float(e.get("dur", 0.0))
    thread = (e["pid"], e.get("tid"))
    if thread in thread_end:
      idle_us[e["name"]] += max(0.0, start - thread_end[thread])
    thread_end[thread] = max(thread_end.get(thread, start), start + dur)
    total_us[e["name"]] += dur
    count[e["name"]] += 1
  grand = sum(total_us.values()) or 1.0
  return [{"name": name, "us": us / reps, "count": count[name] / reps, "share": us / grand,
           "idle_us": idle_us[name] / reps}
          for name, us in total_us.most_common()]


def kernel_times(fn, *args, reps: int = 5, calls_per_run: int = 1,
                 process_prefix: str = GPU_PROCESS, thread_contains: str = "") -> dict:
  """Profiles `reps` runs of fn(*args) (after one untraced run that compiles) and returns
  {"kernels": summarize(...), "summary": {wall_us, kernel_us, busy_fraction, kernels_per_call}},
  per call: a run is `calls_per_run` calls (e.g. a program chaining several layers' steps)."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      start = time.perf_counter()
      for _ in range(reps):
        jax.block_until_ready(fn(*args))
      wall_us = (time.perf_counter() - start) * 1e6 / (reps * calls_per_run)
    rows = summarize(load_trace_events(log_dir), reps=reps * calls_per_run,
                     process_prefix=process_prefix, thread_contains=thread_contains)
  kernel_us = sum(r["us"] for r in rows)
  return {"kernels": rows,
          "summary": {"wall_us": wall_us, "kernel_us": kernel_us,
                      "idle_us": sum(r["idle_us"] for r in rows),
                      "busy_fraction": kernel_us / wall_us if wall_us else 0.0,
                      "kernels_per_call": sum(r["count"] for r in rows)}}


def markdown(profile: dict, title: str, top: int = 25) -> str:
  """A section with the summary line and the `top` largest kernels."""
  s = profile["summary"]
  lines = [f"### {title}", "",
           f"Per call: wall {s['wall_us']:.1f} us (profiled, so slower than the timed rows), "
           f"kernels {s['kernel_us']:.1f} us over {s['kernels_per_call']:.1f} launches "
           f"(busy {100 * s['busy_fraction']:.0f}%); streams idle between kernels "
           f"{s.get('idle_us', float('nan')):.1f} us.", "",
           "| kernel | us per call | launches per call | share | idle before, us per call |",
           "|---|---|---|---|---|"]
  for r in profile["kernels"][:top]:
    name = r["name"] if len(r["name"]) <= 80 else r["name"][:77] + "..."
    lines.append(f"| `{name}` | {r['us']:.1f} | {r['count']:.1f} | {100 * r['share']:.1f}% | "
                 f"{r.get('idle_us', float('nan')):.1f} |")
  if len(profile["kernels"]) > top:
    rest = profile["kernels"][top:]
    lines.append(f"| ({len(rest)} more) | {sum(r['us'] for r in rest):.1f} | "
                 f"{sum(r['count'] for r in rest):.1f} | "
                 f"{100 * sum(r['share'] for r in rest):.1f}% | "
                 f"{sum(r.get('idle_us', 0.0) for r in rest):.1f} |")
  return "\n".join(lines) + "\n"
