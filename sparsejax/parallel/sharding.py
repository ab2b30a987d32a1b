"""Meshes and logical-axis sharding rules.

Parameters carry logical axis names (`logical_axes` metadata, set in `sparsejax.layers.common`);
the rules below map each name to mesh axes. The same code runs on one device (every mesh axis
of size 1) and on N devices.
"""
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. FSDP shards the embedding dimension of every weight; tensor
# parallelism shards heads, the FFN hidden dimension and the vocabulary. KV heads stay replicated
# over `tensor` (GQA models often have fewer KV heads than tensor shards).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", None),
    ("expert_mlp", "tensor"),  # each expert's hidden units, like "mlp"
    ("kv_heads", None),
    ("head_dim", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; `data=-1` takes all devices left over."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    if len(devices) % (fsdp * tensor):
      raise ValueError(
          f"make_mesh: {len(devices)} devices are not divisible by fsdp*tensor={fsdp * tensor}")
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ValueError(
        f"make_mesh: data*fsdp*tensor = {data}*{fsdp}*{tensor} = {data * fsdp * tensor} must equal "
        f"the number of devices ({len(devices)})")
  grid = np.asarray(devices).reshape(data, fsdp, tensor)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
  """PartitionSpec for one array. A dimension that the mapped mesh axes do not divide stays
  replicated (correct, only less distributed), and a mesh axis is used at most once."""
  rule_map = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    if name is not None and name not in rule_map:
      raise ValueError(f"logical_to_spec: no sharding rule for logical axis {name!r}")
    target = rule_map.get(name) if name is not None else None
    target = (target,) if isinstance(target, str) else tuple(target or ())
    target = tuple(a for a in target if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in target)
    if not target or dim % size:
      spec.append(None)
      continue
    used.update(target)
    spec.append(target[0] if len(target) == 1 else target)
  return P(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """A pytree like `nnx.to_pure_dict(state)` holding the NamedSharding of each parameter."""
  def one(variable):
    shape = variable.get_value().shape  # also works on abstract (ShapeDtypeStruct) values
    axes = variable.get_metadata().get("logical_axes") or (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))
  shardings = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over the data and fsdp axes, replicated over tensor."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch (this process's rows) on the mesh as global arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
