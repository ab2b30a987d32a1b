"""FFN kinds for the model's FFN slot. Each returns (output, aux) where aux is a dict of
auxiliary losses ("loss/<name>", already weighted) and metrics ("metric/<name>")."""
import jax
from flax import nnx

from sparsejax.config import ModelConfig
from sparsejax.layers.common import param
from sparsejax.layers.registry import register_ffn


@register_ffn("swiglu")
class SwiGLU(nnx.Module):
  """down(silu(x W_gate) * (x W_up)), the LLaMA/MiniCPM dense FFN."""

  @staticmethod
  def matmul_params(config: ModelConfig) -> int:
    """Weights multiplying each token (for the FLOP count)."""
    return 3 * config.d_model * config.ffn_hidden

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, f, dt = config.d_model, config.ffn_hidden, config.params_dtype
    self.w_gate = param(rngs, (d, f), ("embed", "mlp"), std=config.init_std, dtype=dt)
    self.w_up = param(rngs, (d, f), ("embed", "mlp"), std=config.init_std, dtype=dt)
    self.w_down = param(rngs, (f, d), ("mlp", "embed"),
                        std=config.init_std / (2 * config.num_layers) ** 0.5, dtype=dt)
    self.dtype = config.compute_dtype

  def hidden_units(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [batch, seq, d] -> (hidden [batch, seq, ffn_hidden], w_out [ffn_hidden, d]); the
    output is hidden @ w_out (neuron-level analyses, e.g. PPL-p% sparsity, use this)."""
    dt = self.dtype
    gate = x @ self.w_gate[...].astype(dt)
    up = x @ self.w_up[...].astype(dt)
    return jax.nn.silu(gate) * up, self.w_down[...].astype(dt)

  def __call__(self, x: jax.Array, *, segment_ids=None) -> tuple[jax.Array, dict]:
    hidden, w_out = self.hidden_units(x)
    return hidden @ w_out, {}
