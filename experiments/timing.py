"""Wall-clock timing of a jitted call, shared by the GPU benchmarks."""
import time

import jax
import numpy as np


def samples(fn, *args, iters: int, reps: int = 1, warmup: bool = True) -> list[float]:
  """Milliseconds per call of fn(*args): `iters` samples of `reps` calls dispatched back to back
  and then blocked on (reps > 1 hides the host's dispatch between calls, as in a model's step),
  after two warm-up calls (the first compiles) unless warmup=False."""
  if warmup:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / reps * 1e3)
  return times


def timeit(fn, *args, iters: int, reps: int = 1) -> float:
  """Median of `samples` (milliseconds per call)."""
  return float(np.median(samples(fn, *args, iters=iters, reps=reps)))
