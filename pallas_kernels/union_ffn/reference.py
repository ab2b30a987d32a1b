"""The union-of-experts FFN in plain jnp: the expert-major weights every path reads
(`ExpertWeights`), the semantics (`union_ffn_reference`), the union index the kernels share
(`union_index`, `union_experts`) and the XLA gather path the benchmark compares against
(`union_ffn_gathered`).

BlockFFN's experts are small non-gated FFNs; a layer stores them side by side (the layer layout):

  w_up   [d_model, num_experts, expert_width]     E_i(x) = SiLU(x @ w_up[:, i, :]) @ w_down[i]
  w_down [num_experts, expert_width, d_model]     y_t    = sum_i A[t, i] * E_i(x_t)

weights A [n, num_experts] come from the router (>= 0 after its ReLU; A[t, i] = 0 means expert i
is inactive for token t and contributes exactly nothing, even where E_i(x_t) would overflow).

For inference the weights are static, so they are transposed once per layer into the expert-major
layout `ExpertWeights.from_layer(w_up, w_down)`, in which one expert's weights are contiguous and
each of its hidden units (up) and output columns (down) is one contiguous row; see kernel.py.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertWeights(NamedTuple):
  """A layer's experts in the expert-major layout (a pytree: it goes through jit, scan and
  tree_map like a pair of arrays).

  up_t   [num_experts, expert_width, d_model]   up_t[e, j, :]   = w_up[:, e, j]
  down_t [num_experts, d_model, expert_width]   down_t[e, c, :] = w_down[e, :, c]
  """
  up_t: jax.Array
  down_t: jax.Array

  @classmethod
  def from_layer(cls, w_up: jax.Array, w_down: jax.Array) -> "ExpertWeights":
    """From the layer layout w_up [d_model, E, width], w_down [E, width, d_model]. A copy of
    both matrices (jit it, or call it once when loading the weights: never per step)."""
    if getattr(w_up, "ndim", None) != 3:
      raise ValueError(f"ExpertWeights.from_layer: w_up must be [d_model, num_experts, "
                       f"expert_width], got shape {getattr(w_up, 'shape', type(w_up))}")
    d_model, num_experts, width = w_up.shape
    if getattr(w_down, "shape", None) != (num_experts, width, d_model):
      raise ValueError(f"ExpertWeights.from_layer: w_down must be [num_experts, expert_width, "
                       f"d_model] = {(num_experts, width, d_model)} (from w_up {w_up.shape}), "
                       f"got shape {getattr(w_down, 'shape', type(w_down))}")
    return cls(jnp.transpose(w_up, (1, 2, 0)), jnp.transpose(w_down, (0, 2, 1)))


def union_ffn_reference(x: jax.Array, weights: jax.Array, experts: ExpertWeights) -> jax.Array:
  """The masked per-token sum over every expert, in float32: the semantics the kernel must match.

  x [n, d_model], weights [n, E], experts an ExpertWeights. Returns y [n, d_model] in x.dtype.
  """
  f32 = jnp.float32
  pre = jnp.einsum("nd,ewd->new", x.astype(f32), experts.up_t.astype(f32),
                   precision=jax.lax.Precision.HIGHEST)
  active = weights != 0
  # where, not a plain product: an inactive expert contributes 0 even if its SiLU is inf or NaN.
  h = jnp.where(active[..., None], jax.nn.silu(pre) * weights.astype(f32)[..., None], 0.0)
  y = jnp.einsum("new,edw->nd", h, experts.down_t.astype(f32),
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


def union_mask(weights: jax.Array) -> jax.Array:
  """bool [E]: the experts active for at least one of the n tokens (the union)."""
  return jnp.any(weights != 0, axis=0)


def union_experts(weights: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """(experts int32 [size], count int32 []): the union's experts in ascending order, padded with
  expert 0 past the count (and truncated to `size`: experts past it are dropped).

  Compaction without a sort: with the inclusive prefix count p[e] of the union mask, the u-th
  union expert is the number of experts e with p[e] <= u. The kernels use the same formula.
  """
  active = union_mask(weights).astype(jnp.int32)
  prefix = jnp.cumsum(active)
  count = prefix[-1]
  u = jnp.arange(size, dtype=jnp.int32)
  experts = jnp.sum((prefix[None, :] <= u[:, None]).astype(jnp.int32), axis=1)
  return jnp.where(u < count, experts, 0).astype(jnp.int32), count.astype(jnp.int32)


def union_index(weights: jax.Array, length: int) -> jax.Array:
  """int32 [length]: the union count, then the union's experts ascending, then zeros (the
  `index="xla"` input of the kernels). length must be >= E + 1 (a power of two for Triton)."""
  num_experts = weights.shape[1]
  if length < num_experts + 1:
    raise ValueError(f"union_index: length must be >= num_experts + 1 = {num_experts + 1}, "
                     f"got {length}")
  experts, count = union_experts(weights, num_experts)
  pad = jnp.zeros((length - num_experts - 1,), jnp.int32)
  return jnp.concatenate([count[None], experts, pad])


def union_ffn_gathered(x: jax.Array, weights: jax.Array, experts: ExpertWeights, *,
                       max_union: int) -> jax.Array:
  """The XLA path: gather the union's experts (a static `max_union` of them: XLA needs static
  shapes; contiguous blocks in the expert-major layout), then two matmuls in the weights' dtype
  with float32 accumulation.

  Exact when the union has at most `max_union` experts; experts past it are silently dropped, so
  callers must know a bound (the benchmark does). Shapes as in union_ffn_reference.
  """
  index, count = union_experts(weights, max_union)
  valid = jnp.arange(max_union) < count
  up_t = jnp.take(experts.up_t, index, axis=0)                       # [U, width, d]
  down_t = jnp.take(experts.down_t, index, axis=0)                   # [U, d, width]
  a = jnp.where(valid[None, :], jnp.take(weights, index, axis=1), 0).astype(jnp.float32)
  pre = jnp.einsum("nd,uwd->nuw", x.astype(up_t.dtype), up_t, preferred_element_type=jnp.float32)
  h = jnp.where(a[..., None] != 0, jax.nn.silu(pre) * a[..., None], 0.0)
  y = jnp.einsum("nuw,udw->nd", h.astype(down_t.dtype), down_t,
                 preferred_element_type=jnp.float32)
  return y.astype(x.dtype)
