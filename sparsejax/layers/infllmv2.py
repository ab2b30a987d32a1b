"""InfLLM-V2 dense-sparse switchable attention for the model's attention slot.

No new parameters: the projections, RoPE and cache handling are the dense layer's; only `attend`
changes. Sequences (or caches) shorter than `dense_len` run dense attention (cuDNN on a GPU);
longer ones select blocks per query token and KV head and attend to them
(`sparsejax.ops.infllmv2`). A checkpoint trained with attention="dense" loads unchanged.
"""
import dataclasses

from flax import nnx

from sparsejax.config import ModelConfig
from sparsejax.layers.attention import GroupedQueryAttention
from sparsejax.layers.registry import register_attention
from sparsejax.ops.infllmv2 import InfLLMv2Config, infllmv2_attention

# attention_options keys that belong to the dense path rather than to InfLLMv2Config.
DENSE_OPTIONS = ("implementation",)


def infllmv2_config(config: ModelConfig) -> InfLLMv2Config:
  """The InfLLMv2Config carried in ModelConfig.attention_options (unknown keys are errors)."""
  options = config.attention_kwargs()
  fields = {f.name for f in dataclasses.fields(InfLLMv2Config)}
  unknown = sorted(set(options) - fields - set(DENSE_OPTIONS))
  if unknown:
    raise ValueError(f"ModelConfig.attention_options has unknown keys {unknown} for "
                     f"attention='infllmv2'; known: {sorted(fields | set(DENSE_OPTIONS))}")
  return InfLLMv2Config(**{k: v for k, v in options.items() if k in fields})


@register_attention("infllmv2")
class InfLLMv2Attention(GroupedQueryAttention):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.sparse = infllmv2_config(config)

  def attend(self, q, k, v, *, segment_ids, kv_segment_ids=None, q_start=None, kv_lengths=None):
    if k.shape[1] < self.sparse.dense_len:
      return super().attend(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                            q_start=q_start, kv_lengths=kv_lengths)
    return infllmv2_attention(q, k, v, self.sparse, segment_ids=segment_ids,
                              kv_segment_ids=kv_segment_ids, q_start=q_start,
                              kv_lengths=kv_lengths)
