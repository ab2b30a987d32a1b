"""The decoder-only LM: embedding, pre-norm blocks (attention + FFN from the registries), head."""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax import layers as _layers  # noqa: F401  (registers the built-in kinds)
from sparsejax.config import ModelConfig
from sparsejax.layers.common import RMSNorm, param
from sparsejax.layers.kv_cache import KVCache, write_rows
from sparsejax.layers.registry import ATTENTION_KINDS, FFN_KINDS, lookup


class Block(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    eps, pdt = config.norm_eps, config.params_dtype
    self.attn_norm = RMSNorm(config.d_model, eps=eps, param_dtype=pdt)
    self.attn = lookup(ATTENTION_KINDS, config.attention, "attention")(config, rngs=rngs)
    self.ffn_norm = RMSNorm(config.d_model, eps=eps, param_dtype=pdt)
    self.ffn = lookup(FFN_KINDS, config.ffn, "ffn")(config, rngs=rngs)

  def __call__(self, x, positions, segment_ids, cache, cache_lengths, cache_segment_ids):
    h, cache = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids,
                         cache=cache, cache_lengths=cache_lengths,
                         cache_segment_ids=cache_segment_ids)
    x = x + h
    h, aux = self.ffn(self.ffn_norm(x), segment_ids=segment_ids)
    return x + h, cache, aux


class DecoderLM(nnx.Module):
  """tokens [batch, seq] -> logits [batch, seq, vocab_size] (float32)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"),
                       std=1.0, dtype=config.params_dtype)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=config.params_dtype)
    if not config.tie_embeddings:
      self.head = param(rngs, (config.d_model, config.vocab_size), ("embed", "vocab"),
                        std=config.init_std, dtype=config.params_dtype)

  def __call__(
      self,
      tokens: jax.Array,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array], KVCache | None]:
    """Runs the model.

    Args:
      tokens: [batch, seq] int token ids.
      positions: [batch, seq] RoPE positions; defaults to 0..seq-1 (plus the cache length when
        decoding).
      segment_ids: [batch, seq] document ids of a packed row (0 = padding); tokens attend only
        within their document. None means one document per row.
      cache: a `KVCache`; this call's tokens are appended at each row's `lengths` offset and
        attend to the cached tokens of the same segment.
    Returns:
      (logits [batch, seq, vocab] float32, aux dict of summed auxiliary losses and averaged
      metrics from the FFNs, the updated cache or None).
    """
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"DecoderLM: tokens must be [batch, seq], got shape {tokens.shape}")
    batch, seq = tokens.shape
    if seq > cfg.max_seq_len:
      raise ValueError(
          f"DecoderLM: sequence length {seq} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
      if arr is not None and arr.shape != tokens.shape:
        raise ValueError(f"DecoderLM: {name} must have shape {tokens.shape}, got {arr.shape}")
    cache_lengths = cache_segment_ids = None
    if cache is not None:
      if cache.segment_ids.shape[0] != batch or len(cache.layers) != cfg.num_layers:
        raise ValueError(
            f"DecoderLM: cache is for batch {cache.segment_ids.shape[0]} and "
            f"{len(cache.layers)} layers; got batch {batch} and the model has {cfg.num_layers}")
      if seq > cache.capacity:
        raise ValueError(f"DecoderLM: {seq} tokens do not fit a cache of capacity {cache.capacity}")
      cache_lengths = cache.lengths
      if segment_ids is None:
        segment_ids = jnp.ones((batch, seq), jnp.int32)
      cache_segment_ids = write_rows(cache.segment_ids, segment_ids, cache_lengths)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
      if cache is not None:
        positions = positions + cache_lengths[:, None]

    x = self.embed[...].astype(cfg.compute_dtype)[tokens]
    new_layers, aux_list = [], []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else cache.layers[i]
      call = nnx.remat(Block.__call__) if cfg.remat else Block.__call__
      x, layer_cache, aux = call(block, x, positions, segment_ids, layer_cache, cache_lengths,
                                 cache_segment_ids)
      new_layers.append(layer_cache)
      aux_list.append(aux)
    x = self.final_norm(x)
    # The embedding is initialised at unit scale (inputs pass through RMSNorm first); used as
    # the tied output head it is scaled by 1/sqrt(d_model) so initial logits stay O(1).
    head = self.embed[...].T * cfg.d_model ** -0.5 if cfg.tie_embeddings else self.head[...]
    logits = jnp.einsum("btd,dv->btv", x, head.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(tuple(new_layers), cache_segment_ids, cache_lengths + seq)
    return logits, _merge_aux(aux_list), new_cache


def with_config(model: DecoderLM, **changes) -> DecoderLM:
  """The same parameters (shared, not copied) under a config with `changes`, e.g. another
  attention kind, its options or max_seq_len: none of these changes a parameter, so a checkpoint
  trained dense runs with InfLLM-V2 or a sliding window as it is. A change that would alter a
  parameter's shape fails in the merge."""
  if not changes:
    return model
  config = dataclasses.replace(model.config, **changes)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
  _, state = nnx.split(model)
  return nnx.merge(graphdef, state)


def backbone_qkv(model, tokens: jax.Array, positions: jax.Array | None = None
                 ) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """Pre-RoPE (q, k, v) of every layer, from one forward pass of the frozen backbone.

  Args:
    model: a `DecoderLM` whose attention layers are `GroupedQueryAttention` (or subclasses).
    tokens: [b, t] int tokens; positions: [b, t] RoPE positions (default 0..t-1).
  Returns:
    One (q [b, t, heads, d], k [b, t, kv_heads, d], v [b, t, kv_heads, d]) per layer, in the
    model's compute dtype, with gradients stopped (the backbone is frozen).
  """
  blocks = list(model.blocks)
  previous = [block.attn.capture_qkv for block in blocks]
  try:
    for block in blocks:
      block.attn.capture_qkv = True
    # nnx.capture collects what the layers sow (sowing outside it is deprecated in flax 0.12).
    _, captured = nnx.capture(model, nnx.Intermediate)(tokens, positions=positions)
    captured = nnx.to_pure_dict(captured)
  finally:
    for block, flag in zip(blocks, previous):
      block.attn.capture_qkv = flag
  out = []
  for i in range(len(blocks)):
    (qkv,) = captured["blocks"][i]["attn"]["qkv"]  # sow keeps a tuple of the values stored
    out.append(tuple(jax.lax.stop_gradient(x) for x in qkv))
  return out


def _merge_aux(aux_list: list[dict]) -> dict[str, jax.Array]:
  """Losses ("loss/...", and the raw "scaled_loss/..." that the trainer weights by an adaptive
  coefficient) are summed over layers; metrics ("metric/...") averaged."""
  merged: dict[str, list] = {}
  for aux in aux_list:
    for name, value in aux.items():
      merged.setdefault(name, []).append(value)
  return {name: (sum(vals) if name.startswith(("loss/", "scaled_loss/")) else sum(vals) / len(vals))
          for name, vals in merged.items()}


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def matmul_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (parameters that multiply activations) + causal attention.

  The embedding lookup is not a matmul; the output head is (also when tied). The attention term
  counts q.k and p.v over the causal half: 2 matmuls x 2 FLOPs x seq/2 x heads x head_dim per
  layer forward, x3 for forward + backward. The FFN kind's class says how many of its weights
  multiply each token in training (`matmul_params(config)`).
  """
  c = config
  ffn = lookup(FFN_KINDS, c.ffn, "ffn")
  if not hasattr(ffn, "matmul_params"):
    raise ValueError(f"FFN kind {c.ffn!r} ({ffn.__name__}) must define matmul_params(config), "
                     "the weights multiplying each token, for the FLOP count")
  per_layer = (c.d_model * c.num_heads * c.head_dim * 2
               + c.d_model * c.num_kv_heads * c.head_dim * 2
               + ffn.matmul_params(c))
  matmul_params = c.num_layers * per_layer + c.d_model * c.vocab_size
  attention = c.num_layers * 6 * seq_len * c.num_heads * c.head_dim
  return 6 * matmul_params + attention
