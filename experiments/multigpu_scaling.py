"""Multi-GPU scaling of the sharded trainer: matching losses, throughput, checkpoint resharding.

  python -m experiments.multigpu_scaling --config=configs/pretrain_100m.py \
      --out=experiments/results/multigpu_scaling
  (on the 2-GPU machine: bash experiments/gpu_multigpu.sh)

In one process: the config trained on one device, then on each mesh over all N devices, with the
same seeds and the same global batch. Per mesh: whether the first --loss_steps losses match the
single-device run's to bf16 noise, tokens/s over --timed_steps further steps, and the scaling
efficiency (tokens/s over N x the single run's). A checkpoint written on N devices is restored on
one device and on the CPU, and compared bit for bit. Writes <out>.json and <out>.md.
"""
import dataclasses
import gc
import json
import os
import re
import shutil
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from sparsejax.model import DecoderLM
from sparsejax.train.loss import lm_loss_sums
from sparsejax.train.trainer import Trainer, peak_flops

# Mesh name -> its (data, fsdp, tensor) shape over n devices.
MESHES = {
    "data": lambda n: (n, 1, 1),
    "fsdp": lambda n: (1, n, 1),
    # Tensor parallelism over pairs of devices, FSDP across the pairs: on 2 GPUs this is
    # fsdp 1 x tensor 2, i.e. tensor parallelism alone.
    "fsdp_tensor": lambda n: (1, n // 2, 2),
}
# The mesh whose checkpoint is restored, when it runs: FSDP shards every weight, so restoring its
# checkpoint on one device really reassembles the parameters (a data-parallel one holds them whole).
CHECKPOINT_MESH = "fsdp"

# "Same losses up to bf16 noise". The sharded step computes the same math as the one-device step
# but sums in another order (matmuls split over devices, gradients all-reduced); in bf16, which
# keeps 8 significant bits, that moves a step's loss by up to about 1e-3 relative, and Adam
# carries such differences forward (it normalises small gradient differences into full-size
# updates), so the two trajectories drift apart slowly. A sharding bug (a wrongly split batch, a
# missing or doubled gradient reduction, a mis-sharded weight) should move the loss by much more
# within a few steps. The bounds: under 1% of the 2-6 nats the loss goes through over these steps
# at the worst step, a quarter of that on average.
MAX_ABS_LOSS_DIFF = 0.02
MEAN_ABS_LOSS_DIFF = 0.005
CRITERION = (f"a mesh's losses match the single-device run's to bf16 noise when, over the loss "
             f"steps, max |loss - single loss| <= {MAX_ABS_LOSS_DIFF} nats and the mean "
             f"<= {MEAN_ABS_LOSS_DIFF} nats")
# The scaling efficiency the issue asks of data parallelism and FSDP at 4k context.
SCALING_TARGET = 0.85
TARGET_MESHES = ("data", "fsdp")
# Tokens of one batch row whose loss compares the restored models with the one that was saved
# (small, since one of them runs on the CPU).
ROW_TOKENS = 256
# Where the checkpoint is restored: {label in the JSON's keys: words in the table}.
RESTORE_LABELS = {"1gpu": "one device", "cpu": "the CPU"}


def define_flags() -> None:
  """The binary's flags, defined when it runs rather than on import: the tests import this
  module beside other binaries whose flags (workdir, out) would otherwise collide."""
  config_flags.DEFINE_config_file("config", "configs/pretrain_100m.py", "Experiment config file.")
  flags.DEFINE_list("meshes", list(MESHES), f"Meshes over all devices, from {list(MESHES)}.")
  flags.DEFINE_integer("loss_steps", 50, "Steps whose losses are compared with the "
                       "single-device run's (logged one by one).")
  flags.DEFINE_integer("timed_steps", 60, "Steps after the loss steps, timed in logging windows "
                       "of timed_steps // 2 (the first a warm-up).")
  flags.DEFINE_string("workdir", "/tmp/runs/multigpu",
                      "Root of the runs' workdirs (<root>/<mesh>, emptied first).")
  flags.DEFINE_string("out", "experiments/results/multigpu_scaling",
                      "Output path prefix: writes <out>.json and <out>.md.")
  flags.DEFINE_bool("cpu_restore", True, "Also restore the checkpoint on the CPU.")


def mesh_shapes(names, n: int, batch_size: int) -> dict[str, tuple[int, int, int]]:
  """{name: (data, fsdp, tensor)} of each named mesh over n devices; {} on one device, where no
  mesh spans several. Raises ValueError naming the mesh that does not fit."""
  unknown = [name for name in names if name not in MESHES]
  if unknown:
    raise ValueError(f"meshes: unknown {unknown}; known: {list(MESHES)}")
  if n == 1:
    return {}
  shapes = {}
  for name in names:
    data, fsdp, tensor = shape = MESHES[name](n)
    if data * fsdp * tensor != n:
      raise ValueError(f"meshes: {name} is data x fsdp x tensor = {data} x {fsdp} x {tensor}, "
                       f"which does not divide the {n} devices (tensor=2 needs an even number)")
    if batch_size % (data * fsdp):
      raise ValueError(f"meshes: {name} splits the batch over data x fsdp = {data * fsdp} "
                       f"devices, which does not divide config.train.batch_size={batch_size}")
    shapes[name] = shape
  return shapes


def timed_throughput(history, start_step: int, tokens_per_step: int) -> float:
  """Tokens/s over the logging windows of a train() call that began at `start_step`, leaving out
  its first window.

  The trainer's own summary would count that window: its rule (`step > log_every`) leaves out only
  a window that begins at step 0, where compilation falls. Here the first window is the warm-up:
  it begins on a device left idle by the one-by-one logging of the loss steps, and a
  re-compilation, if any, would fall in it. A window's seconds are its logged tokens/s undone.
  """
  ends = [h["step"] for h in history]
  steps = [end - begin for begin, end in zip([start_step] + ends, ends)][1:]
  seconds = [n * tokens_per_step / h["tokens_per_s"] for n, h in zip(steps, history[1:])]
  return sum(steps) * tokens_per_step / sum(seconds)


def train_run(config, name: str, shape, devices, workdir: str, loss_steps: int,
              timed_steps: int, log) -> tuple[dict, Trainer]:
  """Trains `config` on `devices` as a (data, fsdp, tensor) = `shape` mesh from a fresh workdir:
  `loss_steps` steps logged one by one, then `timed_steps` timed. Returns (result, trainer);
  the caller closes the trainer."""
  c = config.copy_and_resolve_references()
  c.workdir = os.path.join(workdir, name)
  shutil.rmtree(c.workdir, ignore_errors=True)  # a checkpoint left there would be refused
  c.resume = False
  c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  c.train.update(eval_every=0, checkpoint_every=0, log_every=1)
  trainer = Trainer(c, progress=False, devices=devices)
  start = time.perf_counter()
  losses = [h["loss"] for h in trainer.train(steps=loss_steps)["history"]]
  log(f"{name} {shape}: {loss_steps} loss steps (compilation included) in "
      f"{time.perf_counter() - start:.0f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
  trainer.config.train.log_every = timed_steps // 2
  history = trainer.train(steps=loss_steps + timed_steps)["history"]
  tokens_per_s = timed_throughput(history, loss_steps, c.train.batch_size * c.data.seq_len)
  peak = peak_flops(devices[0])
  mfu = None if peak is None else tokens_per_s * trainer.flops_per_token / (peak * len(devices))
  log(f"{name} {shape}: {tokens_per_s:,.0f} tokens/s"
      + ("" if mfu is None else f", MFU {mfu:.1%}"))
  return {"mesh": name, "shape": list(shape), "tokens_per_s": tokens_per_s, "mfu": mfu,
          "losses": losses}, trainer


def free_memory() -> None:
  """Frees a finished trainer's device arrays once the caller has dropped it: jax's caches hold
  its jitted lambdas, and those lambdas reference the trainer (a cycle only gc collects)."""
  jax.clear_caches()
  gc.collect()


def compare_losses(losses, reference) -> dict:
  diffs = np.abs(np.asarray(losses) - np.asarray(reference))
  return {"max_abs_loss_diff": float(diffs.max()), "mean_abs_loss_diff": float(diffs.mean()),
          # The first step's loss comes before any update: the forward pass alone.
          "first_step_abs_loss_diff": float(diffs[0]),
          "losses_match": bool(diffs.max() <= MAX_ABS_LOSS_DIFF
                               and diffs.mean() <= MEAN_ABS_LOSS_DIFF)}


def row_loss_fn(trainer: Trainer):
  """loss(params, row) of the trainer's model, jitted, with XLA's attention wherever it runs:
  dense attention picks cuDNN by jax.default_backend(), which stays "gpu" for a model placed on
  the CPU of a GPU process."""
  options = trainer.model_config.attention_kwargs() | {"implementation": "xla"}
  config = dataclasses.replace(trainer.model_config,
                               attention_options=tuple(sorted(options.items())))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))), nnx.Param)

  @jax.jit
  def loss(params, row, token_bytes):
    logits, _, _ = nnx.merge(graphdef, params)(row["inputs"], positions=row["positions"],
                                               segment_ids=row["segment_ids"])
    sums = lm_loss_sums(logits, row["targets"], row["loss_mask"], token_bytes)
    return sums["nll"] / jnp.maximum(sums["tokens"], 1.0)

  def on(trainer: Trainer, row) -> float:
    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    return float(loss(trainer.params, jax.device_put(row, replicated),
                      jax.device_put(trainer.token_bytes, replicated)))

  return on


def same_values(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def on_shardings(tree, shardings) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim),
                                          tree, shardings)))


def error_summary(error: Exception) -> str:
  """The error in one line: the innermost "SomeError: message" line of its text (XLA wraps an
  error raised while compiling, such as a custom partitioner's, in its own), else the first."""
  lines = [line.strip() for line in f"{type(error).__name__}: {error}".splitlines()
           if line.strip()]
  named = [line for line in lines if re.match(r"\w+(Error|Exception): ", line)]
  return (named or lines)[-1]


def restore_check(written: Trainer, devices, saved, row, row_loss, written_loss: float) -> dict:
  """Restores `written`'s newest checkpoint through a new Trainer (resume) on a one-device mesh
  of `devices` and compares it with `saved`, the state that was written."""
  c = written.config.copy_and_resolve_references()
  c.resume = True
  c.mesh.update(data=1, fsdp=1, tensor=1)
  restored = Trainer(c, progress=False, devices=devices)
  try:
    loss = row_loss(restored, row)
    check = {
        "on": f"1 x {devices[0].device_kind}",
        "state_equal": same_values(saved, jax.device_get(
            {"params": restored.params, "opt_state": restored.opt_state})),
        "step_restored": restored.step == written.step,
        "on_new_mesh": (on_shardings(restored.params, restored.param_shardings)
                        and on_shardings(restored.opt_state, restored.opt_shardings)),
        "row_loss": loss, "row_loss_abs_diff": abs(loss - written_loss)}
  finally:
    restored.close()
  check["ok"] = check["state_equal"] and check["step_restored"] and check["on_new_mesh"]
  return check


def check_checkpoint(trainer: Trainer, restore_on: dict, failures: list, log) -> dict:
  """Saves `trainer`'s state, then restores it on each of `restore_on` ({label: [one device]}).
  A restore must give the saved parameters and optimizer state bit for bit, the saved step, and
  arrays sharded for its own mesh. The loss of the first ROW_TOKENS tokens of one batch row, on
  the model as written and as restored, shows what the new devices' arithmetic changes. A
  restore that raises is recorded (and appended to `failures`), not raised."""
  trainer.save(wait=True)
  saved = jax.device_get({"params": trainer.params, "opt_state": trainer.opt_state})
  # The batch after the last trained step: data none of the runs trained on.
  tokens = min(ROW_TOKENS, trainer.data_config.seq_len)
  row = {k: np.asarray(v)[:1, :tokens] for k, v in next(trainer.data_iter).items()}
  row_loss = row_loss_fn(trainer)
  written_loss = row_loss(trainer, row)
  result = {"written_on": f"{mesh_text(trainer.mesh)} on {trainer.mesh.size} x "
                          f"{trainer.mesh.devices.flat[0].device_kind}",
            "step": trainer.step, "row_tokens": tokens, "row_loss_written": written_loss}
  result |= {f"restored_on_{label}_equal": None for label in RESTORE_LABELS}  # None: not tried
  for label, devices in restore_on.items():
    free_memory()  # the previous restore's trainer
    try:
      check = restore_check(trainer, devices, saved, row, row_loss, written_loss)
      log(f"checkpoint restored on {check['on']}: state equal {check['state_equal']}, step "
          f"restored {check['step_restored']}, row loss {check['row_loss']:.5f} (written "
          f"{written_loss:.5f})")
    except Exception as e:  # recorded, so that one call still reports everything else
      log(f"checkpoint restore on {label} failed:\n{traceback.format_exc()}")
      check = {"on": f"1 x {devices[0].device_kind}", "ok": False, "error": error_summary(e)}
      failures.append(f"restore on {label}: {check['error']}")
    result[f"restored_on_{label}"] = check
    result[f"restored_on_{label}_equal"] = check["ok"]
  return result


def mesh_text(mesh) -> str:
  return " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())


def run_scaling(config, meshes, loss_steps: int, timed_steps: int, workdir: str,
                cpu_restore: bool) -> dict:
  """The single-device run, then every mesh in `meshes` over all devices, then the report (the
  JSON's content). A mesh run or a restore that raises is recorded in the report and listed in
  its "failures", and the rest goes on; the single run, which every comparison needs, raises."""
  if loss_steps < 1:
    raise ValueError(f"loss_steps must be >= 1, got {loss_steps}")
  if timed_steps < 2:
    raise ValueError(f"timed_steps must be >= 2 (a warm-up window and a timed one), got "
                     f"{timed_steps}")
  start = time.perf_counter()

  def log(message: str) -> None:
    print(f"[{time.perf_counter() - start:4.0f} s] {message}", flush=True)

  devices = jax.devices()
  n = len(devices)
  shapes = mesh_shapes(meshes, n, config.train.batch_size)
  # Looked up now, so that a process without a CPU backend fails before the runs, not after.
  cpu = jax.devices("cpu")[:1] if cpu_restore else None
  restore_on = ({"1gpu": devices[:1]} if shapes else {}) | ({"cpu": cpu} if cpu else {})
  log(f"{n} x {devices[0].device_kind}; meshes {shapes or 'none (one device)'}; checkpoint "
      f"restored on {list(restore_on) or 'nothing'}")
  failures = []
  result = {"device": devices[0].device_kind, "n_devices": n, "jax": jax.__version__,
            "loss_steps": loss_steps, "timed_steps": timed_steps,
            "timed_log_every": timed_steps // 2, "criterion": CRITERION,
            "scaling_target": {"efficiency": SCALING_TARGET, "meshes": list(TARGET_MESHES)},
            "note": None if shapes else "no multi-device mesh ran (one device, or none in "
                                        "meshes): only the single run and, with cpu_restore, "
                                        "its checkpoint's restore on the CPU",
            "failures": failures, "rows": [], "checkpoint": None}

  single, trainer = train_run(config, "single", (1, 1, 1), devices[:1], workdir, loss_steps,
                              timed_steps, log)
  result["config"] = {"params": trainer.num_params, "seq_len": trainer.data_config.seq_len,
                      "global_batch": config.train.batch_size,
                      "tokens_per_step": config.train.batch_size * trainer.data_config.seq_len,
                      "dtype": trainer.model_config.dtype,
                      "attention": trainer.model_config.attention}
  result["single"] = single
  if not shapes:  # one device: the single run's checkpoint goes to the CPU
    result["checkpoint"] = check_checkpoint(trainer, restore_on, failures, log)
  trainer.close()
  del trainer

  # The first mesh run that succeeds writes the checkpoint, and the fsdp mesh runs first.
  for name in sorted(shapes, key=lambda name: name != CHECKPOINT_MESH):
    free_memory()  # the previous run's trainer, finished or failed
    try:
      run, trainer = train_run(config, name, shapes[name], devices, workdir, loss_steps,
                               timed_steps, log)
    except Exception as e:  # recorded, so that one call still reports the other meshes
      log(f"{name} {shapes[name]} failed:\n{traceback.format_exc()}")
      result["rows"].append({"mesh": name, "shape": list(shapes[name]),
                             "error": error_summary(e)})
      failures.append(f"{name}: {error_summary(e)}")
      continue
    run["scaling_efficiency"] = run["tokens_per_s"] / (n * single["tokens_per_s"])
    run["meets_target"] = (run["scaling_efficiency"] >= SCALING_TARGET
                           if name in TARGET_MESHES else None)
    run |= compare_losses(run["losses"], single["losses"])
    result["rows"].append(run)
    log(f"{name}: scaling efficiency {run['scaling_efficiency']:.1%}, max |dloss| "
        f"{run['max_abs_loss_diff']:.4f}, mean {run['mean_abs_loss_diff']:.4f}")
    if result["checkpoint"] is None:
      result["checkpoint"] = check_checkpoint(trainer, restore_on, failures, log)
    trainer.close()
    del trainer
  return result


def percent(x) -> str:
  return "n/a" if x is None else f"{x:.1%}"


def yes_no(x) -> str:
  return "n/a" if x is None else ("yes" if x else "**no**")


def mesh_row(row: dict) -> str:
  shape = " x ".join(map(str, row["shape"]))
  if "error" in row:
    return f"| {row['mesh']} | {shape} | **failed**: {row['error']} | | | | | | |"
  target = ("" if row["meets_target"] is None else
            f" (target {SCALING_TARGET:.0%}: {'met' if row['meets_target'] else '**missed**'})")
  return (f"| {row['mesh']} | {shape} | {row['tokens_per_s']:,.0f} | "
          f"{percent(row['scaling_efficiency'])}{target} | {percent(row['mfu'])} | "
          f"{row['max_abs_loss_diff']:.4f} | {row['mean_abs_loss_diff']:.4f} | "
          f"{row['first_step_abs_loss_diff']:.2e} | {yes_no(row['losses_match'])} |")


def restore_row(label: str, check: dict) -> str:
  where = f"{RESTORE_LABELS[label]} ({check['on']})"
  if "error" in check:
    return f"| {where} | **failed**: {check['error']} | | | | |"
  return (f"| {where} | {yes_no(check['state_equal'])} | {yes_no(check['step_restored'])} | "
          f"{yes_no(check['on_new_mesh'])} | {check['row_loss']:.5f} | "
          f"{check['row_loss_abs_diff']:.2e} |")


def write_outputs(result: dict, out: str) -> str:
  """Writes <out>.json and <out>.md; returns the markdown."""
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  cfg, single, n = result["config"], result["single"], result["n_devices"]
  lines = [
      "# Multi-device scaling of the sharded trainer", "",
      f"{n} x {result['device']}, jax {result['jax']}. {cfg['params']:,} parameters, "
      f"{cfg['dtype']} compute, {cfg['attention']} attention, seq_len {cfg['seq_len']}, the "
      f"same global batch of {cfg['global_batch']} rows ({cfg['tokens_per_step']:,} tokens), "
      "seeds and data on every mesh.", "",
      f"Command: `{result.get('command', '')}`", "",
      f"Single device (data 1 x fsdp 1 x tensor 1, same machine, same process): "
      f"{single['tokens_per_s']:,.0f} tokens/s, MFU {percent(single['mfu'])}.", ""]
  if result["note"]:
    lines += [f"Note: {result['note']}.", ""]
  if result["failures"]:
    lines += ["**Failed** (tracebacks in the log):", ""]
    lines += [f"- {failure}" for failure in result["failures"]] + [""]
  if result["rows"]:
    lines += ["| mesh | data x fsdp x tensor | tokens/s | scaling efficiency | MFU | "
              "max abs dloss | mean abs dloss | step-1 abs dloss | losses match |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [mesh_row(row) for row in result["rows"]]
    lines += [
        "",
        f"- Losses: the first {result['loss_steps']} steps, each against the single run's same "
        f"step; {CRITERION}. Step 1 comes before any update (the forward pass alone). Per-step "
        "losses of every run are in the JSON.",
        f"- Throughput: {result['timed_steps']} steps after the loss steps, logged every "
        f"{result['timed_log_every']}; the first window is a warm-up and left out. Scaling "
        f"efficiency = tokens/s on {n} devices / ({n} x the single device's tokens/s); the "
        f"issue's target is >= {SCALING_TARGET:.0%} for {' and '.join(TARGET_MESHES)}.",
        f"- fsdp_tensor is fsdp {n // 2} x tensor 2"
        + (" (on 2 devices: tensor parallelism alone)." if n == 2 else ".")]
  ckpt = result["checkpoint"]
  if ckpt:
    lines += ["", "## Checkpoint resharding", "",
              f"Written at step {ckpt['step']} on {ckpt['written_on']}, restored through a new "
              "Trainer (resume) on a one-device mesh: the parameters and optimizer state must "
              "come back bit for bit, with the step, every array sharded for the new mesh. Row "
              f"loss: the first {ckpt['row_tokens']} tokens of one row of the next batch, with "
              f"XLA's attention; the model as written: {ckpt['row_loss_written']:.5f}.", "",
              "| restored on | state bit-equal | step restored | on the new mesh | row loss | "
              "abs diff |", "|---|---|---|---|---|---|"]
    lines += [restore_row(label, ckpt[f"restored_on_{label}"])
              for label in RESTORE_LABELS if f"restored_on_{label}" in ckpt]
  markdown = re.sub(r"\n{3,}", "\n\n", "\n".join(lines) + "\n")  # one blank line between parts
  with open(out + ".md", "w") as f:
    f.write(markdown)
  return markdown


def main(argv):
  del argv
  # NVLink multicast (NVLS) stays off: on the lent multi-GPU hosts a program that uses it can put
  # the host's GPUs, which others share, out of service for a day or more. NCCL reads this when
  # JAX starts its GPU backend (the first jax.devices()), so it is set before anything does.
  os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS
  result = run_scaling(FLAGS.config, FLAGS.meshes, FLAGS.loss_steps, FLAGS.timed_steps,
                       FLAGS.workdir, FLAGS.cpu_restore)
  result["command"] = " ".join(["python3 -m experiments.multigpu_scaling"] + sys.argv[1:])
  print(write_outputs(result, FLAGS.out))
  if result["failures"]:
    raise SystemExit(f"failed: {'; '.join(result['failures'])}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
