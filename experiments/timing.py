"""Wall-clock timing of a jitted call, shared by the GPU benchmarks."""
import time

import jax
import numpy as np


def timeit(fn, *args, iters: int, reps: int = 1) -> float:
  """Median milliseconds per call of fn(*args) after two warm-up calls (the first compiles), over
  `iters` samples of `reps` calls dispatched back to back and then blocked on (reps > 1 hides
  the host's dispatch between calls, as in a model's step)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / reps)
  return float(np.median(times)) * 1e3
