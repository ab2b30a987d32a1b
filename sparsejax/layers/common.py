"""Parameter helpers and the small modules every block uses."""
import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.ops.norm import rms_norm


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], *,
          std: float, dtype) -> nnx.Param:
  """A normal-initialised parameter carrying logical axis names (mapped to mesh axes by
  `sparsejax.parallel.sharding`)."""
  if len(axes) != len(shape):
    raise ValueError(f"param: axes {axes} do not match shape {shape}")
  init = nnx.initializers.normal(std)
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)
