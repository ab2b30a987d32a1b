"""Attention kinds for the model's attention slot.

`GroupedQueryAttention` owns the projections, RoPE and the KV-cache bookkeeping; the way queries
meet keys lives in `attend`, which sparse kinds override (InfLLM-V2 adds no parameters: it only
changes `attend`).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.config import ModelConfig
from sparsejax.layers.common import param
from sparsejax.layers.kv_cache import LayerKV, write_rows
from sparsejax.layers.registry import register_attention
from sparsejax.ops.attention import dense_attention
from sparsejax.ops.rope import apply_rope


@register_attention("dense")
class GroupedQueryAttention(nnx.Module):
  """Multi-head attention with num_kv_heads KV heads shared by groups of query heads."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    std, dt = config.init_std, config.params_dtype
    self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std=std, dtype=dt)
    self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std=std, dtype=dt)
    self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std=std, dtype=dt)
    self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"),
                    std=std / (2 * config.num_layers) ** 0.5, dtype=dt)
    self.config = config
    self.window = None  # unlimited; SlidingWindowAttention sets it
    # When True, each call stores its pre-RoPE (q, k, v) as an nnx.Intermediate "qkv"
    # (read them with nnx.pop(model, nnx.Intermediate)); off in training and generation.
    self.capture_qkv = False

  def __call__(
      self,
      x: jax.Array,
      *,
      positions: jax.Array,
      segment_ids: jax.Array | None,
      cache: LayerKV | None = None,
      cache_lengths: jax.Array | None = None,
      cache_segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, LayerKV | None]:
    """x: [batch, seq, d_model] -> ([batch, seq, d_model], updated cache or None).

    With a cache, this call's tokens are written at slots cache_lengths[b]... of row b and
    attend to everything cached before them; `cache_segment_ids` [batch, capacity] are the
    cache's segment ids after the write (the model computes them once for all layers).
    """
    cfg = self.config
    q, k, v = self.project_qkv(x)
    if self.capture_qkv:  # for analyses that need the pre-RoPE projections (Locret's heads)
      self.sow(nnx.Intermediate, "qkv", (q, k, v))
    q = apply_rope(q, positions, cfg.rope_base)
    k = apply_rope(k, positions, cfg.rope_base)
    if cache is None:
      out = self.attend(q, k, v, segment_ids=segment_ids)
      new_cache = None
    else:
      new_cache = self.write_cache(cache, k, v, cache_lengths)
      out = self.attend_cache(q, new_cache, segment_ids=segment_ids,
                              kv_segment_ids=cache_segment_ids, q_start=cache_lengths,
                              kv_lengths=cache_lengths + x.shape[1])
    return self.project_out(out), new_cache

  def write_cache(self, cache: LayerKV, k: jax.Array, v: jax.Array,
                  offsets: jax.Array) -> LayerKV:
    """Writes this call's post-RoPE k, v [batch, seq, kv_heads, hd] at per-row offsets [batch].
    Kinds that keep derived state in the cache (InfLLM-V2's compressed keys) extend it."""
    return cache.replace(k=write_rows(cache.k, k, offsets), v=write_rows(cache.v, v, offsets))

  def attend_cache(self, q: jax.Array, cache: LayerKV, **mask) -> jax.Array:
    """`attend` of q [batch, seq, heads, hd] to the cache after this call's write (`mask`: the
    segment ids, q_start and kv_lengths of `attend`); kinds that read the cache's derived state
    override it."""
    dt = self.config.compute_dtype
    return self.attend(q, cache.k.astype(dt), cache.v.astype(dt), **mask)

  def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [batch, seq, d_model] -> pre-RoPE q [b, s, heads, hd], k and v [b, s, kv_heads, hd]."""
    dt = self.config.compute_dtype
    return (jnp.einsum("btd,dnh->btnh", x, self.wq[...].astype(dt)),
            jnp.einsum("btd,dkh->btkh", x, self.wk[...].astype(dt)),
            jnp.einsum("btd,dkh->btkh", x, self.wv[...].astype(dt)))

  def project_out(self, out: jax.Array) -> jax.Array:
    """Attention output [batch, seq, heads, hd] -> [batch, seq, d_model]."""
    return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(self.config.compute_dtype))

  def attend(self, q, k, v, *, segment_ids, kv_segment_ids=None, q_start=None, kv_lengths=None):
    """The attention proper; see `sparsejax.ops.attention` for the shapes and the mask."""
    return dense_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                           q_start=q_start, kv_lengths=kv_lengths, window=self.window,
                           implementation=self.config.attention_kwargs().get("implementation"),
                           max_segments=self.config.max_segments_per_row + 1)  # + the padding run


@register_attention("sliding_window")
class SlidingWindowAttention(GroupedQueryAttention):
  """Each token attends to itself and the window - 1 tokens before it (attention_options:
  {"window": tokens}); the local-only baseline of the sparse-attention ablations. Same
  parameters as dense attention."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    options = config.attention_kwargs()
    unknown = sorted(set(options) - {"window", "implementation"})
    if unknown or not isinstance(options.get("window"), int) or options["window"] < 1:
      raise ValueError(
          "attention='sliding_window' needs attention_options={'window': positive int} (and "
          f"optionally 'implementation'); got {options}")
    self.window = options["window"]
