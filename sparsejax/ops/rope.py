"""Rotary position embedding (RoPE), rotate-half convention."""
import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + d/2]) by position-dependent angles.

  Args:
    x: [batch, seq, heads, head_dim] with an even head_dim.
    positions: [batch, seq] integer positions (per document in packed rows).
    base: the RoPE wavelength base.
  Returns:
    An array like `x`. Angles are computed in float32 so long positions stay exact.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"apply_rope: head_dim must be even, got x.shape={x.shape}")
  if positions.shape != x.shape[:2]:
    raise ValueError(
        f"apply_rope: positions must have shape {x.shape[:2]} (batch, seq), got {positions.shape}")
  half = head_dim // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, s, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
