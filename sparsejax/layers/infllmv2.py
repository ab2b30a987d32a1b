"""InfLLM-V2 dense-sparse switchable attention for the model's attention slot.

No new parameters: the projections, RoPE and cache handling are the dense layer's; only `attend`
changes. Sequences (or caches) shorter than `dense_len` run dense attention (cuDNN on a GPU);
longer ones select blocks per query token and KV head and attend to them
(`sparsejax.ops.infllmv2`). A checkpoint trained with attention="dense" loads unchanged.
"""
import dataclasses

import jax
from flax import nnx

from pallas_kernels.sparse_attention import sparse_attention as sparse_attention_kernel

from sparsejax.config import ModelConfig
from sparsejax.layers.attention import GroupedQueryAttention
from sparsejax.layers.registry import register_attention
from sparsejax.ops.infllmv2 import InfLLMv2Config, infllmv2_attention, score_and_select

# attention_options keys that are not InfLLMv2Config fields: "implementation" picks the dense
# attention ("xla" | "cudnn" | None), "kernel" the sparse one ("pallas" | "interpret" |
# "reference" | None = the Pallas kernel on a GPU, the jnp reference elsewhere), and
# "selection_chunk" how many queries the (jnp) block selection scores at a time.
LAYER_OPTIONS = ("implementation", "kernel", "selection_chunk")


def infllmv2_config(config: ModelConfig) -> InfLLMv2Config:
  """The InfLLMv2Config carried in ModelConfig.attention_options (unknown keys are errors)."""
  options = config.attention_kwargs()
  fields = {f.name for f in dataclasses.fields(InfLLMv2Config)}
  unknown = sorted(set(options) - fields - set(LAYER_OPTIONS))
  if unknown:
    raise ValueError(f"ModelConfig.attention_options has unknown keys {unknown} for "
                     f"attention='infllmv2'; known: {sorted(fields | set(LAYER_OPTIONS))}")
  return InfLLMv2Config(**{k: v for k, v in options.items() if k in fields})


@register_attention("infllmv2")
class InfLLMv2Attention(GroupedQueryAttention):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.sparse = infllmv2_config(config)
    self.kernel = config.attention_kwargs().get("kernel")
    self.selection_chunk = config.attention_kwargs().get("selection_chunk", 2048)

  def attend(self, q, k, v, *, segment_ids, kv_segment_ids=None, q_start=None, kv_lengths=None):
    if k.shape[1] < self.sparse.dense_len:
      return super().attend(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                            q_start=q_start, kv_lengths=kv_lengths)
    kernel = self.kernel or ("pallas" if jax.default_backend() == "gpu" else "reference")
    if kernel == "reference" or q_start is not None:  # decoding has no kernel yet (issue 3)
      return infllmv2_attention(q, k, v, self.sparse, segment_ids=segment_ids,
                                kv_segment_ids=kv_segment_ids, q_start=q_start,
                                kv_lengths=kv_lengths)
    # Selection is discrete (no gradient), then the block-sparse kernel attends.
    block_idx, block_valid = score_and_select(
        jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), self.sparse, segment_ids=segment_ids,
        query_chunk=self.selection_chunk)
    out, _ = sparse_attention_kernel(q, k, v, block_idx, block_valid,
                                     block_size=self.sparse.block_size, segment_ids=segment_ids,
                                     implementation=kernel)
    return out
