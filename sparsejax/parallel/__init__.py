"""Meshes, sharding rules and shard_map code."""
from sparsejax.parallel.sharding import (DEFAULT_RULES, batch_sharding, logical_to_spec, make_mesh,
                                         param_shardings, shard_batch)

__all__ = ["DEFAULT_RULES", "batch_sharding", "logical_to_spec", "make_mesh", "param_shardings",
           "shard_batch"]
