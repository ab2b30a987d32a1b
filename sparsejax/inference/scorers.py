"""Eviction scorers: one importance score per cached token per KV head.

The interface: a scorer is a function `score(inputs: ScoreInputs, config) -> [batch, kv_heads,
capacity] float32` that returns the new score of every cache slot after a step (a prefill chunk,
the final local chunk or a decoded token) was appended. It sees the layer index, the step's
pre-RoPE q, k, v, the attention probabilities the step's queries gave to every slot (computed by
the attention anyway), the scores stored so far and the slots' positions. Slots past a head's live
length are ignored by the policy, so their scores may be anything. The policy
(`eviction_cache.evict`) then keeps the top-b per KV head, with stabilizers and sinks.

Register a new one with `@register_scorer("name")`; `config` is the `EvictionConfig` (its
scorer-specific fields: snapkv_window, snapkv_kernel, snapkv_pooling, seed).
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class ScoreInputs(NamedTuple):
  """What a scorer sees after one step of T tokens was appended (S = cache capacity)."""
  layer: int               # the layer index
  q: jax.Array             # [batch, T, heads, head_dim] pre-RoPE queries of the step
  k: jax.Array             # [batch, T, kv_heads, head_dim] pre-RoPE keys of the step
  v: jax.Array             # [batch, T, kv_heads, head_dim] values of the step
  probs: jax.Array         # [batch, kv_heads, group, T, S] attention of the step's queries;
                           # zero for padding queries and invisible slots
  scores: jax.Array        # [batch, kv_heads, S] stored scores (0 in the step's new slots)
  positions: jax.Array     # [batch, kv_heads, S] original positions of the slots
  new_index: jax.Array     # [batch, kv_heads, S] index t in the step of the token a slot holds
                           # when it was appended by this step, else -1
  query_valid: jax.Array   # [batch, T] bool: real tokens of the step (right padding False)
  rng: jax.Array           # a PRNG key for this (step, layer)
  heads: Any = None        # the retaining heads module (locret), else None


ScorerFn = Callable[[ScoreInputs, Any], jax.Array]
SCORERS: dict[str, ScorerFn] = {}


def register_scorer(name: str):
  def wrap(fn: ScorerFn) -> ScorerFn:
    SCORERS[name] = fn
    return fn
  return wrap


def scatter_new(inputs: ScoreInputs, new_scores: jax.Array) -> jax.Array:
  """Stored scores with the step's tokens' scores [batch, T, kv_heads] put in their slots
  (for scorers that score a token once, when it arrives)."""
  idx = jnp.maximum(inputs.new_index, 0)
  per_slot = jnp.take_along_axis(new_scores.astype(jnp.float32).transpose(0, 2, 1), idx, axis=2)
  return jnp.where(inputs.new_index >= 0, per_slot, inputs.scores)


@register_scorer("locret")
def locret(inputs: ScoreInputs, config) -> jax.Array:
  """Locret: the retaining head's causal-importance prediction of each new token from its
  pre-RoPE [q; k; v]; a cached token keeps the score it got when it arrived."""
  del config
  if inputs.heads is None:
    raise ValueError("scorer 'locret' needs retaining heads: pass heads=RetainingHeads(...)")
  new = inputs.heads(inputs.layer, inputs.q, inputs.k, inputs.v)  # [b, T, kv_heads]
  want = inputs.k.shape[:3]
  if new.shape != want:
    raise ValueError(f"retaining heads returned scores of shape {new.shape}; expected {want} "
                     "(batch, tokens, kv_heads)")
  return scatter_new(inputs, new)


@register_scorer("snapkv")
def snapkv(inputs: ScoreInputs, config) -> jax.Array:
  """SnapKV: the attention the last `snapkv_window` queries give each entry, summed over the
  window and the query heads of the KV group, pooled over neighbouring slots (kernel
  `snapkv_kernel`, max or avg, stride 1, 'same' padding as SnapKV's pool1d).

  SnapKV observes the prompt's last window once; under chunked prefill the window is each step's
  last `snapkv_window` real queries and every live entry is re-scored by it (the latest window's
  vote replaces the stored score). Neighbours are neighbouring slots: after an eviction they are
  the neighbouring kept tokens.
  """
  steps = inputs.probs.shape[3]
  t = jnp.arange(steps)
  n_valid = jnp.sum(inputs.query_valid, axis=-1)
  window = (t[None, :] >= n_valid[:, None] - config.snapkv_window) & inputs.query_valid
  votes = jnp.einsum("bkgts,bt->bks", inputs.probs, window.astype(jnp.float32))
  kernel = config.snapkv_kernel
  pad = ((0, 0), (0, 0), (kernel // 2, kernel // 2))
  if config.snapkv_pooling == "max":
    return jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), pad)
  # avg_pool1d counts the zero padding (count_include_pad): divide by the kernel everywhere.
  return jax.lax.reduce_window(votes, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), pad) / kernel


@register_scorer("h2o")
def h2o(inputs: ScoreInputs, config) -> jax.Array:
  """H2O: the attention an entry has received from every query so far (all query heads of the
  KV group), accumulated across chunks and decoding steps in the stored scores."""
  del config
  return inputs.scores + jnp.sum(inputs.probs, axis=(2, 3))


@register_scorer("streaming")
def streaming(inputs: ScoreInputs, config) -> jax.Array:
  """StreamingLLM: sinks + the most recent tokens. The score is the position (newest highest);
  the sinks come from the policy's `n_sinks`."""
  del config
  return inputs.positions.astype(jnp.float32)


@register_scorer("random")
def random(inputs: ScoreInputs, config) -> jax.Array:
  """A floor: each token draws one uniform score when it arrives (seeded by config.seed), so
  the kept set is a uniform random subset of the tokens seen."""
  del config
  return scatter_new(inputs, jax.random.uniform(inputs.rng, inputs.k.shape[:3]))
