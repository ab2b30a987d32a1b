"""The public op: BlockFFN's union-of-experts FFN for a few tokens, with an implementation switch.

  experts = ExpertWeights.from_layer(w_up, w_down)       # once per layer, when loading weights
  y = union_ffn(x, weights, experts, implementation="pallas" | "interpret" | "reference",
                config=UnionFFNConfig(...))
  # or the one-launch path, which reads the down weights in the layer's own layout:
  experts = FusedExpertWeights.from_layer(w_up, w_down)
  y = union_ffn(x, weights, experts, config=UnionFFNConfig(fusion="fused", ...))

x [n, d_model] (n <= 128 for the kernels: decode, speculative verification, short chunks),
weights [n, E] the router's expert weights (A[t, i] = 0: expert i inactive for token t),
experts the layer's expert weights in the expert-major layout the config's kernels read
(config.fusion "two_kernels": reference.ExpertWeights, up_t [E, width, d_model] and down_t
[E, d_model, width]; "fused": reference.FusedExpertWeights, up_t and down [E, width, d_model] =
w_down), made once from the layer's w_up [d_model, E, width] / w_down [E, width, d_model], so no
call pays for a transpose. "reference" takes either.
Returns y [n, d_model] in x.dtype: y[t] = sum_i A[t, i] * SiLU(x[t] @ w_up[:, i, :]) @ w_down[i],
accumulated in float32 (the kernels round the hidden activations to the weights' dtype between
the two projections, as a dense bf16 FFN does). The kernels read the weights of the union of the
n tokens' experts only, as contiguous blocks; see kernel.py. Inference only: no VJP (jax.grad
through "pallas"/"interpret" fails; "reference" is differentiable).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.union_ffn.kernel import (MAX_ROWS, UnionFFNConfig, kernel_rows,
                                             next_power_of_2, union_ffn_fused_kernel,
                                             union_ffn_kernels)
from pallas_kernels.union_ffn.reference import (AnyExpertWeights, ExpertWeights,
                                                FusedExpertWeights, union_ffn_reference,
                                                union_index)

IMPLEMENTATIONS = ("pallas", "interpret", "reference")
# The weights type (layout) each UnionFFNConfig.fusion reads.
EXPERT_WEIGHTS = {"two_kernels": ExpertWeights, "fused": FusedExpertWeights}


def _check(x, weights, experts, implementation, config, poison):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"union_ffn: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if not isinstance(config, UnionFFNConfig):
    raise ValueError(f"union_ffn: config must be a UnionFFNConfig or None, got {type(config)}")
  if not isinstance(experts, (ExpertWeights, FusedExpertWeights)):
    raise ValueError("union_ffn: experts must be an ExpertWeights or a FusedExpertWeights "
                     "(ExpertWeights.from_layer(w_up, w_down), once per layer), got "
                     f"{type(experts).__name__}")
  fused_layout = isinstance(experts, FusedExpertWeights)
  down_name = "experts.down" if fused_layout else "experts.down_t"
  up_t, down = experts
  for name, v in (("x", x), ("weights", weights), ("experts.up_t", up_t), (down_name, down)):
    if not hasattr(v, "dtype") or not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"union_ffn: {name} must be a floating-point array, got "
                       f"{getattr(v, 'dtype', type(v))}")
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"union_ffn: x must be [n_tokens, d_model] with n_tokens >= 1, got "
                     f"shape {x.shape}")
  n, d_model = x.shape
  if up_t.ndim != 3 or up_t.shape[2] != d_model:
    raise ValueError(f"union_ffn: experts.up_t must be [num_experts, expert_width, "
                     f"d_model={d_model}], got shape {up_t.shape}")
  num_experts, width, _ = up_t.shape
  if fused_layout and down.shape != (num_experts, width, d_model):
    raise ValueError(f"union_ffn: experts.down must be [num_experts, expert_width, d_model] = "
                     f"{(num_experts, width, d_model)} (w_down's layout; from experts.up_t "
                     f"{up_t.shape}), got shape {down.shape}")
  if not fused_layout and down.shape != (num_experts, d_model, width):
    raise ValueError(f"union_ffn: experts.down_t must be [num_experts, d_model, expert_width] = "
                     f"{(num_experts, d_model, width)} (from experts.up_t {up_t.shape}), got "
                     f"shape {down.shape}")
  if weights.shape != (n, num_experts):
    raise ValueError(f"union_ffn: weights must be [n_tokens, num_experts] = {(n, num_experts)}, "
                     f"got shape {weights.shape}")
  if implementation == "reference":
    return
  wanted = EXPERT_WEIGHTS[config.fusion]
  if not isinstance(experts, wanted):
    raise ValueError(f"union_ffn: config.fusion={config.fusion!r} needs experts of type "
                     f"{wanted.__name__} ({wanted.__name__}.from_layer(w_up, w_down)), got "
                     f"{type(experts).__name__}")
  if poison and config.fusion == "fused":
    raise ValueError("union_ffn: poison_outputs=True does not apply to config.fusion='fused': "
                     "its output is accumulated into from zeros and it has no intermediate "
                     "buffer, so there is nothing to poison (a missed tile shows as a wrong "
                     "value against the reference instead)")
  if up_t.dtype != down.dtype:
    raise ValueError(f"union_ffn: experts.up_t and {down_name} must share a dtype, got "
                     f"{up_t.dtype} and {down.dtype}")
  if n > MAX_ROWS:
    raise ValueError(f"union_ffn: x has n_tokens={n}; the kernels take at most {MAX_ROWS} "
                     "(decode / verification sizes): split longer inputs into chunks or use "
                     "implementation='reference'")
  if d_model % 16:
    raise ValueError(f"union_ffn: d_model must be a multiple of 16 for the kernels, got "
                     f"{d_model}")
  if width % 16:
    raise ValueError(f"union_ffn: expert_width must be a multiple of 16 for the kernels, got "
                     f"{width}")


def union_ffn(x: jax.Array, weights: jax.Array, experts: AnyExpertWeights, *,
              implementation: str = "pallas", config: UnionFFNConfig | None = None,
              poison_outputs: bool = False) -> jax.Array:
  """See the module docstring. config: the kernels' tunables (UnionFFNConfig(); ignored by
  "reference"); poison_outputs: run the two kernels on NaN-filled buffers (a coverage test; not
  applicable to fusion="fused", which raises)."""
  config = UnionFFNConfig() if config is None else config
  _check(x, weights, experts, implementation, config, poison_outputs)
  if implementation == "reference":
    return union_ffn_reference(x, weights, experts)
  return _union_ffn_kernels(x, weights, experts, config=config,
                            interpret=implementation == "interpret", poison=poison_outputs)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "poison"))
def _union_ffn_kernels(x, weights, experts, *, config, interpret, poison):
  n, dtype = x.shape[0], x.dtype
  num_experts = experts.up_t.shape[0]
  rows, _ = kernel_rows(n, config.small_n)
  # Padded tokens have zero weights: inactive everywhere, so the union and the real rows are
  # unchanged. Only ragged n pays for the pads (n = 1, 8, 32 with the defaults pay none).
  if rows != n:
    x = jnp.pad(x, ((0, rows - n), (0, 0)))
  experts_pad = 0
  if config.index == "kernel":        # the kernels load all of A: Triton needs a power of two
    experts_pad = next_power_of_2(num_experts) - num_experts
  if rows != n or experts_pad:
    weights = jnp.pad(weights, ((0, rows - n), (0, experts_pad)))
  index = None
  if config.index == "xla":
    index = union_index(weights[:, :num_experts], next_power_of_2(num_experts + 1))
  if config.fusion == "fused":
    # float32 from the kernel's atomics; in a model this cast fuses into the residual add.
    out = union_ffn_fused_kernel(x, weights, index, experts.up_t, experts.down, config=config,
                                 interpret=interpret)
  else:
    out = union_ffn_kernels(x, weights, index, experts.up_t, experts.down_t, config=config,
                            interpret=interpret, poison=poison)
  return out[:n].astype(dtype)
