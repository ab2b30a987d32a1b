"""The training loop: sharded jitted train step, evaluation, logging and exact resume.

The model's parameters live as a pure nested dict of arrays (`nnx.to_pure_dict`); the train step
merges them into the NNX module only inside the jitted function, so the step is a pure function
of (params, opt_state, batch) that jit can shard and donate.
"""
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sparsejax.config import ModelConfig, comma_list
from sparsejax.data import DataConfig, build_tokenizer, load_tokenizer, make_eval_batches
from sparsejax.data import make_train_iterator
from sparsejax.model import DecoderLM, matmul_flops_per_token
from sparsejax.parallel.sharding import make_mesh, param_shardings, shard_batch
from sparsejax.train.checkpoint import Checkpointer, restore_params_from
from sparsejax.train.coefficients import Coefficients, weighted_aux_loss
from sparsejax.train.loss import lm_loss_sums, summarize
from sparsejax.train.metrics import MetricsWriter
from sparsejax.train.optim import make_optimizer
from sparsejax.train.retrieval_mix import RetrievalMixConfig, RetrievalMixIterator

# Dense bf16 peak of the accelerators we count MFU against (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device: jax.Device) -> float | None:
  for name, flops in PEAK_BF16_FLOPS.items():
    if name in device.device_kind:
      return flops
  return None


def token_bytes_table(tokenizer, vocab_size: int) -> np.ndarray:
  table = np.zeros((vocab_size,), np.int32)
  lengths = np.asarray(tokenizer.token_byte_lengths(), np.int32)
  table[:len(lengths)] = lengths
  return table


def model_and_data_configs(config: ml_collections.ConfigDict) -> tuple[ModelConfig, DataConfig]:
  """Builds the typed configs and checks that they agree with each other."""
  model_cfg = ModelConfig.from_dict(config.model)
  data = dict(config.data)
  global_batch = config.train.batch_size
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size={global_batch} must divide over "
                     f"{jax.process_count()} processes")
  data["batch_size"] = global_batch // jax.process_count()
  data["max_segments_per_row"] = model_cfg.max_segments_per_row
  data_cfg = DataConfig(**data)
  if data_cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"data.seq_len={data_cfg.seq_len} exceeds model.max_seq_len="
                     f"{model_cfg.max_seq_len}")
  return model_cfg, data_cfg


def tokenizer_for_run(data_cfg: DataConfig, workdir: str, vocab_size: int, init_from: str = ""):
  """Loads the run's tokenizer from `workdir/tokenizer` or builds and saves it there, so a
  resumed run and `generate` use exactly the tokenizer the model was trained with. A run that
  starts from another run's weights (`init_from`) takes that run's tokenizer instead: the
  weights only mean something under the ids they were trained with."""
  path = os.path.join(workdir, "tokenizer")
  source = os.path.join(init_from, "tokenizer") if init_from else ""
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    tokenizer = load_tokenizer(path)
  elif source and os.path.exists(os.path.join(source, "tokenizer.json")):
    tokenizer = load_tokenizer(source)
    tokenizer.save(path)
  else:
    tokenizer = build_tokenizer(data_cfg)
    tokenizer.save(path)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                     f"{vocab_size}; raise model.vocab_size")
  return tokenizer


class Trainer:
  """Owns the mesh, the sharded state, the data iterator, the checkpoints and the logs."""

  def __init__(self, config: ml_collections.ConfigDict, *, progress: bool = True,
               devices: list[jax.Device] | None = None):
    self.config = config
    self.progress = progress
    self.model_config, self.data_config = model_and_data_configs(config)
    train = config.train
    if train.batch_size % train.grad_accum_steps:
      raise ValueError(f"train.batch_size={train.batch_size} must be a multiple of "
                       f"train.grad_accum_steps={train.grad_accum_steps}")
    os.makedirs(config.workdir, exist_ok=True)
    # Another run's workdir whose newest parameters start this run (restored below).
    init_from = train.get("init_from", "") or ""
    self.tokenizer = tokenizer_for_run(self.data_config, config.workdir,
                                       self.model_config.vocab_size, init_from)
    self.token_bytes = jnp.asarray(token_bytes_table(self.tokenizer, self.model_config.vocab_size))
    self.mesh = make_mesh(**config.mesh, devices=devices)
    self.tx, self.schedule = make_optimizer(train)

    abstract_model = nnx.eval_shape(lambda: DecoderLM(self.model_config, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    self.param_shardings = param_shardings(abstract_params, self.mesh)
    self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    self.flops_per_token = matmul_flops_per_token(self.model_config, self.data_config.seq_len)

    self.checkpointer = Checkpointer(os.path.join(config.workdir, "checkpoints"),
                                     max_to_keep=train.keep_checkpoints)
    if init_from and self.checkpointer.latest_step() is None:
      # Continued pretraining (e.g. dense at 4k -> sparse at 16k): the other run's parameters,
      # shape-checked, in place of a random init (whose compile is skipped); a fresh optimizer
      # state, step 0 and this run's own data pipeline follow as for a new run.
      target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nnx.to_pure_dict(abstract_params), self.param_shardings)
      # Parameters the checkpoint may lack (train.new_params, e.g. NOSA's eviction head on a
      # dense run's weights) keep this run's random init.
      init = jax.jit(lambda: self._init_params(), out_shardings=self.param_shardings)
      self.params, _ = restore_params_from(
          init_from, target, argument="train.init_from",
          new_params=comma_list(train.get("new_params", ""), str, "train.new_params"), init=init)
    else:
      self.params = jax.jit(lambda: self._init_params(), out_shardings=self.param_shardings)()
    opt_state = jax.jit(self.tx.init)(self.params)
    # Moments follow their parameters' shardings; scalars (step counts) that jit placed on one
    # device are replicated over the mesh instead.
    mesh_devices = set(self.mesh.devices.flat)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self.opt_shardings = jax.tree.map(
        lambda x: x.sharding if x.sharding.device_set == mesh_devices else replicated, opt_state)
    self.opt_state = jax.device_put(opt_state, self.opt_shardings)
    self.step = 0
    # Adaptive loss coefficients (host-side; their values are an argument of the train step).
    self.coefficients = Coefficients.for_model(self.model_config)
    self.data_iter = make_train_iterator(self.data_config, self.tokenizer,
                                         shard_index=jax.process_index(),
                                         shard_count=jax.process_count())
    self.retrieval_mix = RetrievalMixConfig.from_config(config.get("retrieval_mix"))
    if self.retrieval_mix.active:
      self.data_iter = RetrievalMixIterator(
          self.data_iter, self.tokenizer, self.retrieval_mix, corpus=self.data_config.source,
          seed=self.data_config.seed, shard_index=jax.process_index())
    self.writer = None  # opened by train(), so a failed construction leaves no open files
    # Fresh lambdas: jax caches traces per function object, and bound methods of two Trainers
    # (say, on different meshes in one process) would otherwise share one.
    self._train_step = self._under_mesh(jax.jit(
        lambda p, o, b, c: self._train_step_impl(p, o, b, c), donate_argnums=(0, 1),
        out_shardings=(self.param_shardings, self.opt_shardings, None)))
    self._eval_step = self._under_mesh(jax.jit(lambda p, b: self._eval_step_impl(p, b)))
    self._eval_batches = None
    if self.checkpointer.latest_step() is not None:
      if not config.resume:
        raise ValueError(
            f"workdir {config.workdir} already holds checkpoints (newest step "
            f"{self.checkpointer.latest_step()}); set --config.resume=True to continue that run "
            "or choose a new --config.workdir")
      self.restore()

  def _under_mesh(self, step):
    """Runs (and traces) `step` with this trainer's mesh set, so ops that must place their
    operands themselves (cuDNN attention, see sparsejax.ops.attention) can see it."""
    def call(*args):
      with jax.set_mesh(self.mesh):
        return step(*args)
    return call

  # ---- pure functions (jitted) -------------------------------------------------------------
  def _init_params(self):
    model = DecoderLM(self.model_config, rngs=nnx.Rngs(self.config.train.seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def _forward_sums(self, params, batch):
    model = nnx.merge(self.graphdef, params)
    logits, aux, _ = model(batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
    sums = lm_loss_sums(logits, batch["targets"], batch["loss_mask"], self.token_bytes,
                        self.config.train.z_loss)
    return sums, aux

  def _train_step_impl(self, params, opt_state, batch, coefs=None):
    """One optimizer step. `coefs`: {name: float32 scalar} weights of the "scaled_loss/<name>"
    aux losses (default: the controllers' current values, baked in as constants)."""
    coefs = self.coefficients.values() if coefs is None else coefs
    accum = self.config.train.grad_accum_steps
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def loss_fn(p, mb):
      sums, aux = self._forward_sums(p, mb)
      aux_loss = weighted_aux_loss(aux, coefs)
      # Normalised by the whole batch's token count so microbatch gradients add up exactly.
      loss = (sums["nll"] + sums["z"]) / total_tokens + aux_loss / accum
      return loss, (sums, aux)

    def micro_step(grads, mb):
      (_, (sums, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
      return jax.tree.map(jnp.add, grads, g), (sums, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (sums, aux) = jax.lax.scan(micro_step, zeros, micro)
    sums = jax.tree.map(jnp.sum, sums)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
    metrics = summarize(sums) | {k: jnp.mean(v) for k, v in aux.items()}
    metrics["z_loss"] = sums["z"] / total_tokens
    metrics["real_token_fraction"] = sums["tokens"] / batch["loss_mask"].size  # 1 - padding
    metrics["grad_norm"] = optax.global_norm(grads)  # before clipping
    return params, opt_state, metrics

  def _eval_step_impl(self, params, batch):
    sums, aux = self._forward_sums(params, batch)
    return sums, {k: v for k, v in aux.items() if k.startswith("metric/")}

  # ---- host-side loop ----
  def _checked(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rejects batches the compiled step cannot take (the cuDNN packed-attention bound)."""
    seg = batch["segment_ids"]
    documents = np.max(seg, axis=1)
    limit = self.model_config.max_segments_per_row
    if (documents > limit).any():
      raise ValueError(f"a batch row holds {int(documents.max())} documents but "
                       f"model.max_segments_per_row={limit}; raise it or pack fewer per row")
    return batch

  def evaluate(self) -> dict[str, float]:
    """Loss and bits per byte on the fixed validation batches, and the FFN's metrics
    ("metric/tls", "metric/cls8", ...: the mean over the batches of each batch's value)."""
    if self._eval_batches is None:
      self._eval_batches = make_eval_batches(self.data_config, self.tokenizer,
                                             self.config.train.eval_batches)
    totals = metric_totals = None
    for batch in self._eval_batches:
      sums, metrics = self._eval_step(self.params, shard_batch(batch, self.mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      metric_totals = (metrics if metric_totals is None
                       else jax.tree.map(jnp.add, metric_totals, metrics))
    result = {k: float(v) for k, v in summarize(totals).items()}
    return result | {k: float(v) / len(self._eval_batches) for k, v in metric_totals.items()}

  def save(self, wait: bool = False) -> None:
    meta = {"step": self.step, "model": self.model_config.to_dict(),
            "coefficients": self.coefficients.state_dict()}
    self.checkpointer.save(self.step, params=self.params, opt_state=self.opt_state,
                           data_state=self.data_iter.get_state(), meta=meta, wait=wait)

  def restore(self, step: int | None = None) -> None:
    restored = self.checkpointer.restore(step, params=self.params, opt_state=self.opt_state)
    self.params, self.opt_state = restored["params"], restored["opt_state"]
    self.data_iter.set_state(restored["data"])
    self.step = restored["meta"]["step"]
    if "coefficients" in restored["meta"]:  # older checkpoints have none: the schedules restart
      self.coefficients.load_state_dict(restored["meta"]["coefficients"])

  def train(self, steps: int | None = None) -> dict[str, Any]:
    """Trains until `steps` (default config.train.steps) and returns a summary."""
    cfg = self.config.train
    steps = cfg.steps if steps is None else steps
    tokens_per_step = cfg.batch_size * self.data_config.seq_len
    peak = peak_flops(self.mesh.devices.flat[0])  # this run's devices, not the process's
    if self.writer is None:
      self.writer = MetricsWriter(os.path.join(self.config.workdir, "logs"))
    summary: dict[str, Any] = {"params": self.num_params, "start_step": self.step}
    if self.step == 0 and cfg.eval_every > 0:
      summary["initial_eval"] = self.evaluate()
      self.writer.write("eval", 0, summary["initial_eval"])
    bar = None
    if self.progress:
      from tqdm import tqdm
      bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
    history, window_start, window_steps, timed = [], time.perf_counter(), 0, []
    data_seconds = 0.0  # host time spent waiting for input in the current logging window
    while self.step < steps:
      fetch_start = time.perf_counter()
      batch = shard_batch(self._checked(next(self.data_iter)), self.mesh)
      data_seconds += time.perf_counter() - fetch_start
      coefs = self.coefficients.values()
      self.params, self.opt_state, metrics = self._train_step(self.params, self.opt_state, batch,
                                                              coefs)
      self.step += 1
      window_steps += 1
      self.coefficients.record(self.step, metrics)  # reads the device only when a rule needs it
      if self.step % cfg.log_every == 0 or self.step == steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics.update({f"coef/{k}": float(v) for k, v in coefs.items()})  # used by this step
        elapsed = time.perf_counter() - window_start
        tokens_per_s = window_steps * tokens_per_step / elapsed
        metrics.update(lr=float(self.schedule(self.step - 1)), tokens_per_s=tokens_per_s,
                       data_ms_per_step=1e3 * data_seconds / window_steps)
        if peak is not None:
          metrics["mfu"] = tokens_per_s * self.flops_per_token / (peak * self.mesh.size)
        if self.step > cfg.log_every:  # the first window includes compilation
          timed.append((window_steps, elapsed))
        self.writer.write("train", self.step, metrics)
        history.append({"step": self.step, **metrics})
        if bar is not None:
          bar.set_postfix(loss=f"{metrics['loss']:.3f}", bpb=f"{metrics['bits_per_byte']:.3f}",
                          tok_s=f"{tokens_per_s:,.0f}")
        window_start, window_steps, data_seconds = time.perf_counter(), 0, 0.0
      if bar is not None:
        bar.update(1)
      if cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or self.step == steps):
        ev = self.evaluate()
        self.writer.write("eval", self.step, ev)
        summary["final_eval"] = ev
        if bar is not None:
          bar.write(f"step {self.step}: validation loss {ev['loss']:.4f}, "
                    f"bits/byte {ev['bits_per_byte']:.4f}")
      if cfg.checkpoint_every > 0 and (self.step % cfg.checkpoint_every == 0 or self.step == steps):
        self.save()
    if bar is not None:
      bar.close()
    self.checkpointer.manager.wait_until_finished()
    if timed:
      total_steps = sum(s for s, _ in timed)
      total_time = sum(t for _, t in timed)
      summary["tokens_per_s"] = total_steps * tokens_per_step / total_time
      if peak is not None:
        summary["mfu"] = summary["tokens_per_s"] * self.flops_per_token / (peak * self.mesh.size)
    summary["history"] = history
    summary["step"] = self.step
    return summary

  def model(self) -> DecoderLM:
    """The NNX model holding the current parameters (for generation and analysis)."""
    return nnx.merge(self.graphdef, self.params)

  def close(self) -> None:
    self.checkpointer.close()
    if self.writer is not None:
      self.writer.close()
