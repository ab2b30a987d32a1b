"""experiments/profiling.py: grouping a trace's device events by kernel, per call."""
import jax
import jax.numpy as jnp
import pytest

from experiments import profiling


def _meta(pid, name, tid=None):
  if tid is None:
    return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  return {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}


def test_summarize_groups_device_events_per_call():
  events = [
      _meta(1, "/device:GPU:0"), _meta(1, "Stream #7", tid=7), _meta(2, "/host:CPU"),
      # (listed out of time order: idle time comes from the time order)
      {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.3", "ts": 100.0, "dur": 14.0},
      {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.3", "ts": 0.0, "dur": 10.0},
      {"ph": "X", "pid": 1, "tid": 7, "name": "block_topk", "ts": 13.0, "dur": 40.0},
      {"ph": "X", "pid": 2, "tid": 1, "name": "host_op", "ts": 5.0, "dur": 500.0},  # on the host
      {"ph": "i", "pid": 1, "tid": 7, "name": "marker", "ts": 60.0},      # not a complete event
  ]
  rows = profiling.summarize(events, reps=2)
  assert [r["name"] for r in rows] == ["block_topk", "fusion.3"]
  assert rows[0]["us"] == 20.0 and rows[0]["count"] == 0.5
  assert rows[1]["us"] == 12.0 and rows[1]["count"] == 1.0
  assert rows[0]["share"] == pytest.approx(40 / 64)
  # Idle before: block_topk 13 - 10 = 3 us, the second fusion.3 100 - 53 = 47 us (per call: / 2).
  assert rows[0]["idle_us"] == 1.5 and rows[1]["idle_us"] == 23.5
  assert profiling.summarize(events, reps=1, thread_contains="Stream #8") == []
  with pytest.raises(ValueError, match="reps must be >= 1"):
    profiling.summarize(events, reps=0)


def test_kernel_times_traces_a_real_call():
  """On the CPU the host's executor threads stand in for a GPU's streams."""
  def step(x):
    return jnp.tanh(x @ x.T).sum()

  p = profiling.kernel_times(jax.jit(step), jnp.ones((64, 64)), reps=2, calls_per_run=2,
                             process_prefix="/host:CPU", thread_contains="")
  names = [r["name"] for r in p["kernels"]]
  assert any("PjitFunction(step)" in n for n in names)
  assert p["summary"]["wall_us"] > 0
  text = profiling.markdown(p, "step")
  assert text.startswith("### step") and "| kernel |" in text and "idle before" in text
  assert p["summary"]["idle_us"] >= 0
