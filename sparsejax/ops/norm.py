"""RMSNorm as a pure function."""
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Root-mean-square norm over the last axis, computed in float32.

  Args:
    x: [..., d] activations (any float dtype; the result has the same dtype).
    scale: [d] multiplicative weight.
    eps: added to the mean square before the reciprocal square root.
  """
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)
