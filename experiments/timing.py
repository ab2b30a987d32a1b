"""Wall-clock timing of a jitted call, shared by the GPU benchmarks."""
import time

import jax
import numpy as np


def timeit(fn, *args, iters: int) -> float:
  """Median milliseconds of `iters` calls of fn(*args) after two warm-up calls (the first
  compiles), each call blocked on its result."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3
