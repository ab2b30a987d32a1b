"""Where a pretraining step's time goes: data pipeline vs the jitted step, and parts of the step.

  python -m experiments.bench_train_step --config=configs/pretrain_100m.py

Times (median of --iters after warm-up, on one fixed batch of real data):
  data     next() of the training iterator alone (host)
  step     the full train step (forward, backward, AdamW)
  step_unpacked  the same with one document per row (no segment ids: plain causal cuDNN)
  forward  forward + loss only
and writes a JSON with tokens/s and MFU of each to --out.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.pretrain import _CONFIG
from sparsejax.parallel.sharding import shard_batch
from sparsejax.train.trainer import Trainer, peak_flops

_ITERS = flags.DEFINE_integer("iters", 20, "Timed iterations per measurement.")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 200, "Batches drawn to time the pipeline.")
_OUT = flags.DEFINE_string("out", "", "JSON output path (optional).")


def time_fn(fn, iters):
  fn()  # compile / warm up
  jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  config = _CONFIG.value
  config.train.checkpoint_every = 0
  config.resume = False
  config.workdir = "/tmp/bench_train_step"
  trainer = Trainer(config, progress=False)
  tokens = config.train.batch_size * config.data.seq_len
  peak = peak_flops(jax.devices()[0])
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
             "params": trainer.num_params, "seq_len": config.data.seq_len,
             "batch": config.train.batch_size, "flops_per_token": trainer.flops_per_token}

  start = time.perf_counter()
  batches = [next(trainer.data_iter) for _ in range(_DATA_BATCHES.value)]
  data_s = (time.perf_counter() - start) / len(batches)
  results["data"] = {"ms": data_s * 1e3, "tokens_per_s": tokens / data_s}

  host_batch = batches[-1]
  batch = shard_batch(host_batch, trainer.mesh)
  unpacked = dict(batch, segment_ids=None,
                  positions=jnp.broadcast_to(jnp.arange(config.data.seq_len), batch["inputs"].shape))
  params, opt = trainer.params, trainer.opt_state
  step = jax.jit(trainer._train_step_impl)
  forward = jax.jit(lambda p, b: trainer._forward_sums(p, b)[0]["nll"])

  def unpacked_step(p, o, b):
    return trainer._train_step_impl(p, o, b)
  for name, fn in [("step", lambda: step(params, opt, batch)),
                   ("step_unpacked", lambda: jax.jit(unpacked_step)(params, opt, unpacked)),
                   ("forward", lambda: forward(params, batch))]:
    seconds = time_fn(fn, _ITERS.value)
    entry = {"ms": seconds * 1e3, "tokens_per_s": tokens / seconds}
    if peak and name != "forward":
      entry["mfu"] = tokens / seconds * trainer.flops_per_token / peak
    results[name] = entry
    print(name, entry, flush=True)
  print("data", results["data"])
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
