"""NOSA trainable, offloadable sparse attention for the model's attention slot.

InfLLM-V2's layer (`sparsejax.layers.infllmv2`: same projections, RoPE, cache and kernels) with
NOSA's eviction head: per layer a [kv_heads, head_dim, kv_heads] map W_delta on the values and a
per-KV-head scale A (initialised to 0), whose score s = A * softplus(W_delta . v) picks the
query-agnostic part of every selection and enters attention as the selected keys' logit bias
(`sparsejax.ops.nosa`). Its options are NOSAConfig's fields plus InfLLM-V2's layer options
("kernel", "heads_per_program", "topk_kernel", "block_q"). The two new parameters are
`evict_proj` (W_delta) and `evict_scale` (A = 0 at init: at first the bias is 0 and the
query-agnostic part takes the oldest eligible blocks); every other parameter is the dense
layer's.

Prefill and training run the scoring, top-k and block-sparse kernels (the attention with the
bias on its Triton kernels). The cache (`KVCache.for_model`) keeps the compressed keys and each
token's eviction score, so a decode step runs InfLLM-V2's decode selection kernels at
query_topk, the query-agnostic top-k over the pooled cached scores, and the block-sparse decode
kernel with the bias; a chunked prefill runs the jnp reference over the cache. The cache
offloaded to host memory (NOSA's point: few host-to-device block copies per step) is
`sparsejax.inference.offload`, one layer's state; generation does not use it yet.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.block_scores import score_and_select
from pallas_kernels.block_topk import top_blocks_fn
from pallas_kernels.sparse_attention import sparse_attention as sparse_attention_kernel
from pallas_kernels.sparse_decode import sparse_decode

from sparsejax.config import ModelConfig
from sparsejax.layers.attention import GroupedQueryAttention
from sparsejax.layers.common import param
from sparsejax.layers.infllmv2 import InfLLMv2Attention
from sparsejax.layers.kv_cache import LayerKV, write_rows
from sparsejax.layers.registry import register_attention
from sparsejax.ops.nosa import (NOSAConfig, eviction_scores, nosa_attention, nosa_decode,
                                nosa_select_blocks, nosa_select_decode_blocks)


@register_attention("nosa")
class NOSAAttention(InfLLMv2Attention):
  config_class = NOSAConfig

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    kvh, hd = config.num_kv_heads, config.head_dim
    self.evict_proj = param(rngs, (kvh, hd, kvh), ("kv_heads", "head_dim", None),
                            std=config.init_std, dtype=config.params_dtype)
    self.evict_scale = nnx.Param(jnp.zeros((kvh,), config.params_dtype),
                                 logical_axes=("kv_heads",))

  def eviction_scores(self, v: jax.Array) -> jax.Array:
    """float32 [batch, seq, kv_heads]: the eviction head on values [batch, seq, kv_heads, hd]."""
    return eviction_scores(v, self.evict_scale[...], self.evict_proj[...])

  def attend(self, q, k, v, *, segment_ids, kv_segment_ids=None, q_start=None, kv_lengths=None):
    evict = self.eviction_scores(v)
    kernel = self.kernel
    if kernel == "reference" or q_start is not None:
      return nosa_attention(q, k, v, evict, self.sparse, segment_ids=segment_ids,
                            kv_segment_ids=kv_segment_ids, q_start=q_start,
                            kv_lengths=kv_lengths)
    query_aware = functools.partial(score_and_select, segment_ids=segment_ids,
                                    implementation=kernel,
                                    topk_implementation=self.topk_implementation)
    block_idx, block_valid = nosa_select_blocks(
        q, k, evict, self.sparse, segment_ids=segment_ids, query_aware_fn=query_aware,
        top_blocks_fn=top_blocks_fn(self.topk_implementation))
    out, _ = sparse_attention_kernel(q, k, v, block_idx, block_valid, key_bias=evict,
                                     block_size=self.sparse.block_size, segment_ids=segment_ids,
                                     heads_per_program=self.heads_per_program,
                                     block_q=self.block_q, implementation=kernel)
    return out

  def write_cache(self, cache: LayerKV, k, v, offsets) -> LayerKV:
    """InfLLM-V2's write (k, v and the compressed keys), and the new tokens' eviction scores
    when the cache keeps them."""
    cache = super().write_cache(cache, k, v, offsets)
    if cache.evict is not None:
      cache = cache.replace(evict=write_rows(cache.evict, self.eviction_scores(v), offsets))
    return cache

  def attend_cache(self, q, cache: LayerKV, *, segment_ids, kv_segment_ids=None, q_start=None,
                   kv_lengths=None):
    """A decode step (one token per row) on a cache with compressed keys and eviction scores
    (`KVCache.for_model`): the query-aware blocks from the cached compressed keys (InfLLM-V2's
    decode kernels), the query-agnostic ones from the cached scores, then the block-sparse decode
    kernel with the scores as the bias (the jnp decode off the GPU). Equal to `attend` on the
    same cache, which serves every other cached call (never InfLLM-V2's decode step: it has no
    bias)."""
    s = self.sparse
    compressed = cache.kc is not None and (cache.kc_coarse is not None or not s.approximate_lse)
    if not compressed or cache.evict is None or q.shape[1] != 1:
      return GroupedQueryAttention.attend_cache(
          self, q, cache, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
          q_start=q_start, kv_lengths=kv_lengths)
    dt = self.config.compute_dtype
    k, v = cache.k.astype(dt), cache.v.astype(dt)
    kw = dict(q_start=q_start, kc_coarse=cache.kc_coarse, segment_ids=segment_ids,
              kv_segment_ids=kv_segment_ids)
    if self.kernel == "reference":
      return nosa_decode(q, k, v, cache.kc, cache.evict, s, **kw)
    block_idx, _ = nosa_select_decode_blocks(
        q, cache.kc, cache.evict, s, kv_len=k.shape[1],
        top_blocks_fn=top_blocks_fn(self.topk_implementation),
        selection_keys_fn=self.decode_keys_fn, **kw)
    out, _ = sparse_decode(q[:, 0], k, v, block_idx[:, 0], None, q_start + 1,
                           block_size=s.block_size, key_bias=cache.evict,
                           q_segment_ids=None if segment_ids is None else segment_ids[:, 0],
                           kv_segment_ids=kv_segment_ids, implementation=self.kernel)
    return out[:, None]
