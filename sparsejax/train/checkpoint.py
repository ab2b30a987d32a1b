"""Orbax checkpoints: parameters, optimizer state, step, data-iterator state and run metadata.

A restarted run restores all of them and continues exactly where it stopped. Parameters are
saved as a pure nested dict (`nnx.to_pure_dict`) so checkpoints do not depend on NNX internals.
"""
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat(tree) -> dict[str, Any]:
  """{"blocks/0/attn/wq": leaf, ...}; orbax stores integer dict keys as strings, so both
  spellings map to the same name."""
  return {"/".join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, params, opt_state=None, data_state=None, meta=None,
           wait: bool = False) -> None:
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta or {})}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self.manager.save(step, args=ocp.args.Composite(**items))
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int | None = None, *, params, opt_state=None, with_data: bool = True):
    """Restores into the structure, shapes and shardings of the given abstract (or concrete)
    `params` / `opt_state` trees. Returns a dict with "params", "opt_state", "data", "meta".

    Raises FileNotFoundError when there is no checkpoint and ValueError naming the first
    parameter whose saved shape differs from the model's.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {self.directory}")
    self._check_shapes(step, params)
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    items = {"params": ocp.args.StandardRestore(abstract(params)), "meta": ocp.args.JsonRestore()}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract(opt_state))
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return {name: restored.get(name) if name in items else None
            for name in ("params", "opt_state", "data", "meta")} | {"step": step}

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON metadata (step, model config) of a checkpoint, without loading arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def _check_shapes(self, step: int, params) -> None:
    saved = self.manager.item_metadata(step).get("params")
    if saved is None:
      raise ValueError(f"checkpoint step {step} in {self.directory} has no params")
    saved_flat = {k: tuple(v.shape) for k, v in _flat(saved).items()}
    want_flat = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
    missing = sorted(set(want_flat) - set(saved_flat))
    extra = sorted(set(saved_flat) - set(want_flat))
    if missing or extra:
      raise ValueError(
          f"checkpoint {self.directory} step {step} does not match the model: parameters missing "
          f"from the checkpoint {missing[:5]}, unexpected in it {extra[:5]}")
    for name, shape in want_flat.items():
      if saved_flat[name] != shape:
        raise ValueError(
            f"checkpoint {self.directory} step {step}: parameter {name} has shape "
            f"{saved_flat[name]} in the checkpoint but {shape} in the model (was it written "
            "with another model config?)")

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _without(tree, names):
  """The nested dict `tree` without the leaves whose path ("blocks/0/attn/wq") is in names."""
  def prune(node, prefix):
    if not isinstance(node, dict):
      return node
    out = {}
    for key, child in node.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if path not in names:
        out[key] = prune(child, path)
    return out
  return prune(tree, "")


def _fill(tree, restored):
  """`tree` with every leaf that `restored` also holds (same nested keys) taken from it."""
  if not isinstance(tree, dict):
    return tree if restored is None else restored
  return {key: _fill(child, None if restored is None else restored.get(key))
          for key, child in tree.items()}


def restore_params_from(workdir, params, *, argument: str = "workdir", new_params=(),
                        init=None):
  """The newest checkpointed parameters of the run in `workdir`, as (params, step).

  They are restored into the structure, shapes, dtypes and shardings of `params` (a concrete or
  abstract tree), so a run can start from another run's weights under a different attention kind
  or max_seq_len (neither changes a parameter). Raises ValueError naming `argument` when
  `workdir` holds no checkpoint or a parameter's saved shape differs from the model's.

  new_params: names of parameters (the last part of their path, e.g. "evict_proj") that the
  checkpoint may lack, because the model adds them (NOSA's eviction head on a dense run's
  weights); those come from init(), a concrete tree like `params`. Any other missing parameter
  is an error.
  """
  if not isinstance(workdir, str) or not workdir:
    raise ValueError(f"{argument} must be the workdir of a run (a non-empty string), got "
                     f"{workdir!r}")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ValueError(f"{argument}={workdir!r}: expected a run's workdir holding checkpoints/, "
                     f"found no {ckpt_dir}")
  checkpointer = Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise ValueError(f"{argument}={workdir!r}: {ckpt_dir} holds no checkpoint")
    added = set()
    if new_params:
      saved = set(_flat(checkpointer.manager.item_metadata(step).get("params") or {}))
      added = {name for name in _flat(params)
               if name not in saved and name.rsplit("/", 1)[-1] in set(new_params)}
    try:
      restored = checkpointer.restore(step, params=_without(params, added), with_data=False)
    except ValueError as e:  # the shape check: say which setting pointed here
      raise ValueError(f"{argument}={workdir!r}: {e}") from e
  finally:
    checkpointer.close()
  if not added:
    return restored["params"], step
  if init is None:
    raise ValueError(f"{argument}={workdir!r}: the checkpoint lacks {sorted(added)[:5]}; "
                     "restore_params_from needs init() to make them")
  return _fill(init(), restored["params"]), step


def load_model(workdir: str, step: int | None = None):
  """Rebuilds the model a training run in `workdir` saved, on the local devices.

  Returns (model, tokenizer, meta). The model config comes from the checkpoint's metadata and
  the tokenizer from `workdir/tokenizer`, so nothing has to be passed again.
  """
  from flax import nnx

  from sparsejax.config import ModelConfig
  from sparsejax.data import load_tokenizer
  from sparsejax.model import DecoderLM

  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"load_model: no checkpoints directory at {ckpt_dir}")
  checkpointer = Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    meta = checkpointer.read_meta(step)
    config = ModelConfig.from_dict(meta["model"])
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract_params))
    restored = checkpointer.restore(step, params=target, with_data=False)
  finally:
    checkpointer.close()
  model = nnx.merge(graphdef, restored["params"])
  return model, load_tokenizer(os.path.join(workdir, "tokenizer")), restored["meta"]
