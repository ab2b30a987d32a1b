"""InfLLM-V2 dense-sparse switchable attention for the model's attention slot.

No new parameters: the projections, RoPE and cache handling are the dense layer's; only `attend`
changes. Sequences (or caches) shorter than `dense_len` run dense attention (cuDNN on a GPU);
longer ones select blocks per query token and KV head and attend to them
(`sparsejax.ops.infllmv2`). A checkpoint trained with attention="dense" loads unchanged.

Decoding: a cache made by `KVCache.for_model` also holds the compressed keys, which every write
updates for the windows it completed (`write_cache`); a one-token step then scores blocks from
them and attends with the block-sparse decode kernel (`attend_cache`).
"""
import dataclasses
import functools

import jax
from flax import nnx

from pallas_kernels.block_scores import decode_selection_keys, score_and_select
from pallas_kernels.block_topk import top_blocks_fn
from pallas_kernels.infllmv2_decode import infllmv2_decode as infllmv2_decode_kernels
from pallas_kernels.sparse_attention import sparse_attention as sparse_attention_kernel
from pallas_kernels.sparse_decode import sparse_decode

from sparsejax.config import ModelConfig
from sparsejax.layers.attention import GroupedQueryAttention
from sparsejax.layers.registry import register_attention
from sparsejax.layers.kv_cache import LayerKV
from sparsejax.ops.infllmv2 import (InfLLMv2Config, infllmv2_attention, infllmv2_decode,
                                    select_decode_blocks, update_compressed_keys)

# attention_options keys that are not InfLLMv2Config fields: "implementation" picks the dense
# attention ("xla" | "cudnn" | None), "kernel" the sparse ones: block scoring and block-sparse
# attention ("pallas" | "interpret" | "reference" | None = the Pallas kernels on a GPU, the jnp
# reference elsewhere); "heads_per_program" how many query heads of a KV group share a forward
# program of the block-sparse kernel ("auto": the largest power of two dividing the group, at most
# 16). Sharing shrinks the tokens a program spans (64 / heads), so the union of their selections
# it must visit: at 128k on the H100 the forward's attention took 49 ms at 16 heads against 122 ms
# at 1 (experiments/results/bench_attention_fwd_heads_per_program16.md). "topk_kernel" (default
# True) selects with the sort-free top-k kernel (pallas_kernels/block_topk) instead of XLA's
# top_k and sort, in prefill, training and decoding: the same blocks bit for bit, and at 128k on
# the H100 the selection's top-k took 6.9 ms against 28.7 (experiments/results/
# topk_kernel_run.md; decode selects with it too, 4.1x cuDNN dense in-step at 128k).
# "block_q" sets the query tokens per attention tile (default 64 / heads_per_program: 64 rows);
# 1 is the CUDA kernel's one-token tile, with no union of selections to visit but 16-row
# matmuls: on the H100 at 64k its forward took 37.6 ms against 20.2 at 4 tokens
# (experiments/results/kernel_profile_run.md). "decode_keys_kernel" (default True) computes a
# decode step's selection keys with pallas_kernels/block_scores' two decode kernels instead of a
# dozen XLA fusions; the same blocks. On the H100 at batch 8 (4 programs per SM) a decode step
# took 0.069 ms against XLA's 0.093 at 32k and 0.090 against 0.100 at 128k
# (experiments/results/kernel_dkdv_run.md). With "topk_kernel" too, the second of them also
# runs the top-k: two launches fewer, the same time (decode_1207f.md).
LAYER_OPTIONS = ("implementation", "kernel", "heads_per_program", "topk_kernel", "block_q",
                 "decode_keys_kernel")
MAX_HEADS_PER_PROGRAM = 16


def heads_per_program(option, group: int) -> int:
  """The forward kernel's heads per program for a KV group of `group` query heads."""
  if option in (None, "auto"):
    hp = 1
    while hp * 2 <= MAX_HEADS_PER_PROGRAM and group % (hp * 2) == 0:
      hp *= 2
    return hp
  if isinstance(option, bool) or not isinstance(option, int) or option < 1 \
      or option & (option - 1) or group % option:
    raise ValueError(f"attention_options['heads_per_program'] must be 'auto' or a power of two "
                     f"dividing num_heads / num_kv_heads = {group}, got {option!r}")
  return option


def infllmv2_config(config: ModelConfig, config_class=InfLLMv2Config) -> InfLLMv2Config:
  """The InfLLMv2Config (or subclass, e.g. NOSAConfig) carried in ModelConfig.attention_options
  (unknown keys are errors)."""
  options = config.attention_kwargs()
  fields = {f.name for f in dataclasses.fields(config_class)}
  unknown = sorted(set(options) - fields - set(LAYER_OPTIONS))
  if unknown:
    raise ValueError(f"ModelConfig.attention_options has unknown keys {unknown} for "
                     f"attention={config.attention!r}; known: "
                     f"{sorted(fields | set(LAYER_OPTIONS))}")
  return config_class(**{k: v for k, v in options.items() if k in fields})


def block_sparse_config(config: ModelConfig) -> InfLLMv2Config:
  """The block-selection config of a model whose attention kind selects blocks ("infllmv2",
  "nosa": its layer's config_class built from attention_options)."""
  from sparsejax.layers.registry import ATTENTION_KINDS
  kind = ATTENTION_KINDS.get(config.attention)
  if kind is None or not issubclass(kind, InfLLMv2Attention):
    raise ValueError(f"attention={config.attention!r} selects no blocks (want 'infllmv2' or a "
                     "kind built on it, e.g. 'nosa')")
  return infllmv2_config(config, kind.config_class)


@register_attention("infllmv2")
class InfLLMv2Attention(GroupedQueryAttention):
  config_class = InfLLMv2Config  # what attention_options build (NOSA's layer extends it)

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.sparse = infllmv2_config(config, self.config_class)
    options = config.attention_kwargs()
    self.kernel = (options.get("kernel")
                   or ("pallas" if jax.default_backend() == "gpu" else "reference"))
    self.heads_per_program = heads_per_program(options.get("heads_per_program"),
                                               config.num_heads // config.num_kv_heads)
    topk_kernel = options.get("topk_kernel", True)
    if not isinstance(topk_kernel, bool):
      raise ValueError(f"attention_options['topk_kernel'] must be a bool, got {topk_kernel!r}")
    self.topk_implementation = self.kernel if topk_kernel else "reference"
    decode_keys = options.get("decode_keys_kernel", True)
    if not isinstance(decode_keys, bool):
      raise ValueError(f"attention_options['decode_keys_kernel'] must be a bool, got "
                       f"{decode_keys!r}")
    self.decode_keys_fn = (functools.partial(decode_selection_keys, implementation=self.kernel)
                           if decode_keys and self.kernel != "reference" else None)
    # Both kernels on: the decode scores kernel runs the top-k too, and attends the forced
    # blocks meanwhile (pallas_kernels/infllmv2_decode): three launches a step.
    self.decode_step_fn = (
        functools.partial(infllmv2_decode_kernels, implementation=self.kernel)
        if self.decode_keys_fn is not None and topk_kernel else None)
    # Query tokens per attention tile (None: the kernel's default, 64 / heads_per_program).
    self.block_q = options.get("block_q")
    if self.block_q is not None and (not isinstance(self.block_q, int)
                                     or isinstance(self.block_q, bool) or self.block_q < 1
                                     or self.block_q & (self.block_q - 1)):
      raise ValueError(f"attention_options['block_q'] must be a power of two >= 1, got "
                       f"{self.block_q!r}")

  def attend(self, q, k, v, *, segment_ids, kv_segment_ids=None, q_start=None, kv_lengths=None):
    if k.shape[1] < self.sparse.dense_len:
      return super().attend(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                            q_start=q_start, kv_lengths=kv_lengths)
    kernel = self.kernel
    # With a cache (q_start): chunked prefill, or a cache without compressed keys.
    if kernel == "reference" or q_start is not None:
      return infllmv2_attention(q, k, v, self.sparse, segment_ids=segment_ids,
                                kv_segment_ids=kv_segment_ids, q_start=q_start,
                                kv_lengths=kv_lengths)
    # Selection is discrete (no gradient; the fused scoring kernel, then top-k), then the
    # block-sparse kernel attends.
    block_idx, block_valid = score_and_select(q, k, self.sparse, segment_ids=segment_ids,
                                              implementation=kernel,
                                              topk_implementation=self.topk_implementation)
    out, _ = sparse_attention_kernel(q, k, v, block_idx, block_valid,
                                     block_size=self.sparse.block_size, segment_ids=segment_ids,
                                     heads_per_program=self.heads_per_program,
                                     block_q=self.block_q, implementation=kernel)
    return out

  def write_cache(self, cache: LayerKV, k, v, offsets) -> LayerKV:
    """Also keeps the cache's compressed keys (when it has them) in step with its keys: the
    windows whose last token this write put in place are recomputed, no others."""
    cache = super().write_cache(cache, k, v, offsets)
    s, count = self.sparse, k.shape[1]
    # The keys `attend` would compress (a no-op cast for caches in the compute dtype, which
    # KVCache.for_model makes; only the gathered windows are read).
    keys = cache.k.astype(self.config.compute_dtype)
    if cache.kc is not None:
      cache = cache.replace(kc=update_compressed_keys(
          cache.kc, keys, offsets, count, window=s.compress_window, stride=s.compress_stride))
    if cache.kc_coarse is not None:
      cache = cache.replace(kc_coarse=update_compressed_keys(
          cache.kc_coarse, keys, offsets, count, window=s.lse_window, stride=s.lse_stride))
    return cache

  def attend_cache(self, q, cache: LayerKV, *, segment_ids, kv_segment_ids=None, q_start=None,
                   kv_lengths=None):
    """A decode step (one token per row) on a cache holding compressed keys: blocks scored from
    the cached keys, then the block-sparse decode kernel (the jnp decode off the GPU). Equal to
    `attend` on the same cache. Any other cached call is `attend` on the cache."""
    s = self.sparse
    compressed = cache.kc is not None and (cache.kc_coarse is not None or not s.approximate_lse)
    if not compressed or q.shape[1] != 1 or cache.k.shape[1] < s.dense_len:
      return super().attend_cache(q, cache, segment_ids=segment_ids,
                                  kv_segment_ids=kv_segment_ids, q_start=q_start,
                                  kv_lengths=kv_lengths)
    dt = self.config.compute_dtype
    k, v = cache.k.astype(dt), cache.v.astype(dt)
    kernel = self.kernel
    kw = dict(q_start=q_start, kc_coarse=cache.kc_coarse, segment_ids=segment_ids,
              kv_segment_ids=kv_segment_ids)
    if kernel == "reference":
      return infllmv2_decode(q, k, v, cache.kc, s, **kw)
    if self.decode_step_fn is not None:
      return self.decode_step_fn(q, k, v, cache.kc, s, **kw)
    block_idx, _ = select_decode_blocks(
        q, cache.kc, s, kv_len=k.shape[1], top_blocks_fn=top_blocks_fn(self.topk_implementation),
        selection_keys_fn=self.decode_keys_fn, **kw)
    # No validity mask: select_decode_blocks leaves -1 in every dead slot, which is all the
    # kernel needs (and one XLA op less a step).
    out, _ = sparse_decode(q[:, 0], k, v, block_idx[:, 0], None, q_start + 1,
                           block_size=s.block_size,
                           q_segment_ids=None if segment_ids is None else segment_ids[:, 0],
                           kv_segment_ids=kv_segment_ids, implementation=kernel)
    return out[:, None]
