"""Decode steps of expert-FFN models (BlockFFN, TopK MoE, ReMoE) through the union-of-experts
kernel (pallas_kernels/union_ffn): each step reads only the experts that at least one row of the
batch uses, instead of every expert's weights.

  prepare_union_decode(model)              # once, after loading: per layer, a copy of the
  generate(model, prompts, ...)            # experts in the kernel's layout; decode steps
  clear_union_decode(model)                # (one token per row) now run the kernel

Prefill (more than one token per row) and batches over the kernel's 128 rows keep the dense
path. The kernel's layout is a copy of the layer's expert weights, made once here and cast to
the compute dtype (the parameters stay float32 for training), so a decode step pays no
transpose. Training ignores it, and checkpoints do not hold it (it is not an nnx.Param).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.union_ffn import UnionFFNConfig, union_ffn
from pallas_kernels.union_ffn.kernel import MAX_ROWS
from pallas_kernels.union_ffn.op import EXPERT_WEIGHTS
from sparsejax.layers.moe import ExpertFFN

IMPLEMENTATIONS = ("pallas", "interpret", "reference")
# Single-token decode is where the fused path wins on the H100 (experiments/results/
# bench_ffn.md: n = 1 at 87.5% union sparsity 13.0 us against 16.6 us for two kernels); from 16
# rows at high sparsity the two kernels are faster: pass UnionFFNConfig() for large batches.
DEFAULT_CONFIG = UnionFFNConfig(fusion="fused")


class UnionDecode(nnx.Module):
  """One expert layer's weights in the kernel's layout, and how to run it."""

  def __init__(self, ffn: ExpertFFN, *, implementation: str, config: UnionFFNConfig, dtype):
    layout = EXPERT_WEIGHTS[config.fusion]
    weights = layout.from_layer(ffn.w_up[...].astype(dtype), ffn.w_down[...].astype(dtype))
    self.up_t = nnx.Variable(weights[0])
    self.down = nnx.Variable(weights[1])
    self.layout = layout
    self.implementation = implementation
    self.config = config

  def applies(self, x: jax.Array) -> bool:
    """Whether x [batch, seq, d] is a decode step the kernel takes."""
    return x.shape[1] == 1 and x.shape[0] <= MAX_ROWS

  def __call__(self, x: jax.Array, gates: jax.Array) -> jax.Array:
    """x [batch, 1, d], gates [batch, 1, E] -> [batch, 1, d] in x.dtype."""
    experts = self.layout(self.up_t[...], self.down[...])
    y = union_ffn(x[:, 0], gates[:, 0].astype(jnp.float32), experts,
                  implementation=self.implementation, config=self.config)
    return y[:, None]


def _expert_layers(model) -> list[ExpertFFN]:
  return [block.ffn for block in model.blocks if isinstance(block.ffn, ExpertFFN)]


def prepare_union_decode(model, *, implementation: str = "pallas",
                         config: UnionFFNConfig | None = None, dtype=None) -> int:
  """Installs the kernel in every expert-FFN layer of `model` (in place); returns how many.

  implementation: "pallas" (GPU), "interpret" (the kernel's Pallas interpreter, any backend) or
  "reference" (its jnp semantics); config: the kernel's tunables (default: the fused path);
  dtype: the weights' dtype for the kernel (default: the model's compute dtype).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"prepare_union_decode: implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  config = DEFAULT_CONFIG if config is None else config
  if not isinstance(config, UnionFFNConfig):
    raise ValueError(f"prepare_union_decode: config must be a UnionFFNConfig, got "
                     f"{type(config).__name__}")
  layers = _expert_layers(model)
  if not layers:
    raise ValueError(f"prepare_union_decode: the model has no expert-FFN layers "
                     f"(ffn={model.config.ffn!r}); the kernel serves blockffn, topk_moe and remoe")
  width = layers[0].w_up.shape[-1]
  if implementation != "reference" and (model.config.d_model % 16 or width % 16):
    raise ValueError(f"prepare_union_decode: the kernels need d_model and the expert width to be "
                     f"multiples of 16, got d_model={model.config.d_model}, width={width} (use "
                     "implementation='reference' for other shapes)")
  dtype = model.config.compute_dtype if dtype is None else jnp.dtype(dtype)
  for ffn in layers:
    ffn.union_decode = nnx.data(UnionDecode(ffn, implementation=implementation, config=config,
                                            dtype=dtype))
  return len(layers)


def clear_union_decode(model) -> None:
  """Removes the kernel (and its weight copies) from every expert-FFN layer of `model`."""
  for ffn in _expert_layers(model):
    ffn.union_decode = nnx.data(None)
