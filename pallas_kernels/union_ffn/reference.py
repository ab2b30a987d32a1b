"""The union-of-experts FFN in plain jnp: the expert-major weights the kernels read
(`ExpertWeights` for the two-kernel path, `FusedExpertWeights` for the fused one), the semantics
(`union_ffn_reference`), the union index the kernels share (`union_index`, `union_experts`) and
the XLA gather path the benchmark compares against (`union_ffn_gathered`).

BlockFFN's experts are small non-gated FFNs; a layer stores them side by side (the layer layout):

  w_up   [d_model, num_experts, expert_width]     E_i(x) = SiLU(x @ w_up[:, i, :]) @ w_down[i]
  w_down [num_experts, expert_width, d_model]     y_t    = sum_i A[t, i] * E_i(x_t)

weights A [n, num_experts] come from the router (>= 0 after its ReLU; A[t, i] = 0 means expert i
is inactive for token t and contributes exactly nothing, even where E_i(x_t) would overflow).

For inference the weights are static, so they are transposed once per layer into an expert-major
layout in which one expert's weights are contiguous; see kernel.py. The two kernel paths want the
down projection in different layouts, so each has its own weights type (a pytree of two arrays:
the type says the layout, and a layer holds only the one its config reads):

  ExpertWeights.from_layer(w_up, w_down)        up_t, down_t: each hidden unit (up) and each
                                                output column (down) one contiguous row
  FusedExpertWeights.from_layer(w_up, w_down)   up_t, down: down is w_down itself (no copy):
                                                each hidden unit's d_model outputs contiguous

Every function here takes either.
"""
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp


def _check_layer(name, w_up, w_down):
  """Raises unless w_up [d_model, E, width] and w_down [E, width, d_model] (the layer layout)."""
  if getattr(w_up, "ndim", None) != 3:
    raise ValueError(f"{name}.from_layer: w_up must be [d_model, num_experts, expert_width], "
                     f"got shape {getattr(w_up, 'shape', type(w_up))}")
  d_model, num_experts, width = w_up.shape
  if getattr(w_down, "shape", None) != (num_experts, width, d_model):
    raise ValueError(f"{name}.from_layer: w_down must be [num_experts, expert_width, d_model] = "
                     f"{(num_experts, width, d_model)} (from w_up {w_up.shape}), got shape "
                     f"{getattr(w_down, 'shape', type(w_down))}")


class ExpertWeights(NamedTuple):
  """A layer's experts in the two-kernel path's expert-major layout (a pytree: it goes through
  jit, scan and tree_map like a pair of arrays).

  up_t   [num_experts, expert_width, d_model]   up_t[e, j, :]   = w_up[:, e, j]
  down_t [num_experts, d_model, expert_width]   down_t[e, c, :] = w_down[e, :, c]
  """
  up_t: jax.Array
  down_t: jax.Array

  @classmethod
  def from_layer(cls, w_up: jax.Array, w_down: jax.Array) -> "ExpertWeights":
    """From the layer layout w_up [d_model, E, width], w_down [E, width, d_model]. A copy of
    both matrices (jit it, or call it once when loading the weights: never per step)."""
    _check_layer(cls.__name__, w_up, w_down)
    return cls(jnp.transpose(w_up, (1, 2, 0)), jnp.transpose(w_down, (0, 2, 1)))


class FusedExpertWeights(NamedTuple):
  """A layer's experts in the fused path's layout (UnionFFNConfig(fusion="fused")): up_t as in
  ExpertWeights, the down projection as the layer stores it. A pytree like ExpertWeights.

  up_t [num_experts, expert_width, d_model]   up_t[e, j, :] = w_up[:, e, j]
  down [num_experts, expert_width, d_model]   down[e, j, :] = w_down[e, j, :] (w_down itself)
  """
  up_t: jax.Array
  down: jax.Array

  @classmethod
  def from_layer(cls, w_up: jax.Array, w_down: jax.Array) -> "FusedExpertWeights":
    """From the layer layout (see ExpertWeights.from_layer): a copy of w_up only; w_down is
    kept as it is."""
    _check_layer(cls.__name__, w_up, w_down)
    return cls(jnp.transpose(w_up, (1, 2, 0)), w_down)


AnyExpertWeights = Union[ExpertWeights, FusedExpertWeights]


def down_weights(experts: AnyExpertWeights) -> tuple[jax.Array, str]:
  """(the down projection, its einsum subscripts over (expert e, hidden unit w, output d)), so
  that one einsum serves both layouts without a transpose."""
  if isinstance(experts, FusedExpertWeights):
    return experts.down, "ewd"
  return experts.down_t, "edw"


def union_ffn_reference(x: jax.Array, weights: jax.Array,
                        experts: AnyExpertWeights) -> jax.Array:
  """The masked per-token sum over every expert, in float32: the semantics the kernel must match.

  x [n, d_model], weights [n, E], experts an ExpertWeights or FusedExpertWeights. Returns
  y [n, d_model] in x.dtype.
  """
  f32 = jnp.float32
  pre = jnp.einsum("nd,ewd->new", x.astype(f32), experts.up_t.astype(f32),
                   precision=jax.lax.Precision.HIGHEST)
  active = weights != 0
  # where, not a plain product: an inactive expert contributes 0 even if its SiLU is inf or NaN.
  h = jnp.where(active[..., None], jax.nn.silu(pre) * weights.astype(f32)[..., None], 0.0)
  down, subscripts = down_weights(experts)
  y = jnp.einsum(f"new,{subscripts}->nd", h, down.astype(f32),
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


def union_ffn_gathered(x: jax.Array, weights: jax.Array, experts: AnyExpertWeights, *,
                       max_union: int) -> jax.Array:
  """The XLA path: gather the union's experts (a static `max_union` of them: XLA needs static
  shapes; contiguous blocks in the expert-major layout), then two matmuls in the weights' dtype
  with float32 accumulation.

  Exact when the union has at most `max_union` experts; experts past it are silently dropped, so
  callers must know a bound (the benchmark does). Shapes as in union_ffn_reference.
  """
  index, count = union_experts(weights, max_union)
  valid = jnp.arange(max_union) < count
  # Below, axis e runs over the max_union gathered experts.
  up_t = jnp.take(experts.up_t, index, axis=0)                       # [U, width, d]
  down, subscripts = down_weights(experts)
  down = jnp.take(down, index, axis=0)                               # [U, d, width] / [U, width, d]
  a = jnp.where(valid[None, :], jnp.take(weights, index, axis=1), 0).astype(jnp.float32)
  pre = jnp.einsum("nd,ewd->new", x.astype(up_t.dtype), up_t, preferred_element_type=jnp.float32)
  h = jnp.where(a[..., None] != 0, jax.nn.silu(pre) * a[..., None], 0.0)
  y = jnp.einsum(f"new,{subscripts}->nd", h.astype(down.dtype), down,
                 preferred_element_type=jnp.float32)
  return y.astype(x.dtype)
