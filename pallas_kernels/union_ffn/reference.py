"""The union-of-experts FFN in plain jnp: the semantics (`union_ffn_reference`), the union index
the kernels share (`union_index`, `union_experts`) and the XLA gather path the benchmark compares
against (`union_ffn_gathered`).

BlockFFN's experts are small non-gated FFNs, stored side by side:

  w_up   [d_model, num_experts, expert_width]     E_i(x) = SiLU(x @ w_up[:, i, :]) @ w_down[i]
  w_down [num_experts, expert_width, d_model]     y_t    = sum_i A[t, i] * E_i(x_t)

weights A [n, num_experts] come from the router (>= 0 after its ReLU; A[t, i] = 0 means expert i
is inactive for token t and contributes exactly nothing, even where E_i(x_t) would overflow).
"""
import jax
import jax.numpy as jnp


def union_ffn_reference(x: jax.Array, weights: jax.Array, w_up: jax.Array,
                        w_down: jax.Array) -> jax.Array:
  """The masked per-token sum over every expert, in float32: the semantics the kernel must match.

  x [n, d_model], weights [n, E], w_up [d_model, E, width], w_down [E, width, d_model].
  Returns y [n, d_model] in x.dtype.
  """
  f32 = jnp.float32
  pre = jnp.einsum("nd,dew->new", x.astype(f32), w_up.astype(f32),
                   precision=jax.lax.Precision.HIGHEST)
  active = weights != 0
  # where, not a plain product: an inactive expert contributes 0 even if its SiLU is inf or NaN.
  h = jnp.where(active[..., None], jax.nn.silu(pre) * weights.astype(f32)[..., None], 0.0)
  y = jnp.einsum("new,ewd->nd", h, w_down.astype(f32), precision=jax.lax.Precision.HIGHEST)
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


def union_ffn_gathered(x: jax.Array, weights: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
                       max_union: int) -> jax.Array:
  """The XLA path: gather the union's expert weights (a static `max_union` of them: XLA needs
  static shapes), then two matmuls in the weights' dtype with float32 accumulation.

  Exact when the union has at most `max_union` experts; experts past it are silently dropped, so
  callers must know a bound (the benchmark does). Shapes as in union_ffn_reference.
  """
  experts, count = union_experts(weights, max_union)
  valid = jnp.arange(max_union) < count
  wu = jnp.take(w_up, experts, axis=1)                               # [d, U, width]
  wd = jnp.take(w_down, experts, axis=0)                             # [U, width, d]
  a = jnp.where(valid[None, :], jnp.take(weights, experts, axis=1), 0).astype(jnp.float32)
  pre = jnp.einsum("nd,duw->nuw", x.astype(wu.dtype), wu, preferred_element_type=jnp.float32)
  h = jnp.where(a[..., None] != 0, jax.nn.silu(pre) * a[..., None], 0.0)
  y = jnp.einsum("nuw,uwd->nd", h.astype(wd.dtype), wd, preferred_element_type=jnp.float32)
  return y.astype(x.dtype)
