"""Activation-sparsity metrics of mixture-of-experts FFNs, as pure functions on activation masks.

`active` is a [batch, seq, experts] bool array: True where the expert contributes to the token
(its gate is nonzero, so a sparse kernel must run it). `segment_ids` is the [batch, seq] int
array of a packed batch: 1, 2, ... per document, 0 for padding; None means every token is real
and each row is one document. Padding tokens never count, and no metric looks across a document
boundary: a chunk-sparse kernel serves consecutive tokens of one sequence.

When a batch holds nothing to measure (no real token, no window of L tokens inside one document,
no active expert in any adjacent pair) the metric is NaN, never a made-up 0 or 1.
"""
import jax
import jax.numpy as jnp

# Window lengths L reported as "metric/cls<L>" (BlockFFN reports CLS_L over these; CLS8 is the
# headline number).
CLS_LENGTHS = (2, 4, 8, 16, 32, 64)


def _checked(active: jax.Array, segment_ids: jax.Array | None, fn: str) -> jax.Array:
  """Validates the inputs; returns segment ids [batch, seq] int32 (ones when None)."""
  if active.ndim != 3:
    raise ValueError(f"{fn}: active must be [batch, seq, experts], got shape {active.shape}")
  if active.dtype != jnp.bool_:
    raise ValueError(f"{fn}: active must be a bool array, got dtype {active.dtype}")
  if segment_ids is None:
    return jnp.ones(active.shape[:2], jnp.int32)
  if segment_ids.shape != active.shape[:2]:
    raise ValueError(f"{fn}: segment_ids must have shape {active.shape[:2]} (active's "
                     f"[batch, seq]), got {segment_ids.shape}")
  return segment_ids.astype(jnp.int32)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  return jnp.where(den > 0, num / jnp.maximum(den, 1), jnp.nan).astype(jnp.float32)


def same_document_pairs(segment_ids: jax.Array) -> jax.Array:
  """[batch, seq] int -> [batch, seq - 1] bool: tokens t and t+1 are real and of one document."""
  return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)


def token_level_sparsity(active: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """TLS: the mean over real tokens of the fraction of experts inactive for the token.

  Args:
    active: [batch, seq, experts] bool.
    segment_ids: [batch, seq] int (0 = padding) or None.
  Returns:
    float32 scalar in [0, 1] (NaN without real tokens).
  """
  seg = _checked(active, segment_ids, "token_level_sparsity")
  real = seg != 0
  inactive = jnp.mean(~active, axis=-1, dtype=jnp.float32)  # [b, t]
  return _ratio(jnp.sum(jnp.where(real, inactive, 0.0)), jnp.sum(real))


def chunk_level_sparsity(active: jax.Array, segment_ids: jax.Array | None,
                         chunk_len: int) -> jax.Array:
  """CLS_L: the fraction of experts inactive for all L consecutive tokens of a document.

  Every window of L consecutive real tokens of one document counts (stride 1, so the value does
  not depend on where chunks start); windows that cross a document boundary or touch padding
  are skipped. The result is the mean over those windows of (experts active on no token of the
  window) / experts. CLS_1 equals TLS.

  Args:
    active: [batch, seq, experts] bool.
    segment_ids: [batch, seq] int (0 = padding) or None.
    chunk_len: L, a positive int.
  Returns:
    float32 scalar in [0, 1] (NaN when no document holds L real tokens in a row).
  """
  return chunk_level_sparsities(active, segment_ids, (chunk_len,))[chunk_len]


def chunk_level_sparsities(active: jax.Array, segment_ids: jax.Array | None,
                           lengths) -> dict[int, jax.Array]:
  """{L: CLS_L} for several window lengths, sharing one pass of prefix sums (see
  `chunk_level_sparsity`)."""
  seg = _checked(active, segment_ids, "chunk_level_sparsity")
  for length in lengths:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
      raise ValueError(f"chunk_level_sparsity: chunk_len must be a positive int, got {length!r}")
  batch, seq, experts = active.shape
  # csum[s] = tokens before s on which each expert is active; bsum[t] = document starts <= t.
  csum = jnp.cumsum(active.astype(jnp.int32), axis=1)
  csum = jnp.concatenate([jnp.zeros((batch, 1, experts), jnp.int32), csum], axis=1)
  breaks = jnp.concatenate([jnp.ones((batch, 1), jnp.int32),
                            (~same_document_pairs(seg)).astype(jnp.int32)], axis=1)
  bsum = jnp.cumsum(breaks, axis=1)
  result = {}
  for length in lengths:
    if length > seq:
      result[length] = jnp.float32(jnp.nan)
      continue
    starts = seq - length + 1
    counts = csum[:, length:] - csum[:, :starts]  # [b, starts, E]: activity in [s, s + L)
    inner_breaks = bsum[:, length - 1:] - bsum[:, :starts]  # document starts at s+1 .. s+L-1
    valid = (inner_breaks == 0) & (seg[:, :starts] != 0)
    dead = jnp.mean(counts == 0, axis=-1, dtype=jnp.float32)
    result[length] = _ratio(jnp.sum(jnp.where(valid, dead, 0.0)), jnp.sum(valid))
  return result


def reuse_ratio(active: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """The share of a token's active experts that the previous token of its document also used.

  Over all pairs (t-1, t) of adjacent real tokens of one document,
  reuse = sum_t |A_t ∩ A_{t-1}| / sum_t |A_t|, A_t being the set of experts active for token t
  (a pooled ratio, so tokens with no active expert add nothing instead of 0/0). 1 means a
  token never needs an expert its predecessor did not load.

  Args:
    active: [batch, seq, experts] bool.
    segment_ids: [batch, seq] int (0 = padding) or None.
  Returns:
    float32 scalar in [0, 1] (NaN when no pair has an active expert).
  """
  seg = _checked(active, segment_ids, "reuse_ratio")
  pair = same_document_pairs(seg)[..., None]
  shared = jnp.sum(active[:, 1:] & active[:, :-1] & pair, dtype=jnp.float32)
  current = jnp.sum(active[:, 1:] & pair, dtype=jnp.float32)
  return _ratio(shared, current)


def static_experts(active: jax.Array, segment_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """(never, always): the shares of experts active for none / for every one of the batch's real
  tokens. A router can reach a high TLS and CLS without routing at all: experts that never fire
  (dead: lost capacity) and experts that always do (a dense FFN in disguise) are both perfectly
  "chunk-sparse". Only 1 - never - always of the experts depend on the token.

  Args:
    active: [batch, seq, experts] bool.
    segment_ids: [batch, seq] int (0 = padding) or None.
  Returns:
    Two float32 scalars in [0, 1] (NaN without real tokens).
  """
  seg = _checked(active, segment_ids, "static_experts")
  real = (seg != 0)[..., None]
  fired = jnp.sum(active & real, axis=(0, 1))                # [experts]
  tokens = jnp.sum(real)
  nan = jnp.where(tokens > 0, 0.0, jnp.nan)
  return (jnp.mean(fired == 0, dtype=jnp.float32) + nan,
          jnp.mean(fired == tokens, dtype=jnp.float32) + nan)


def sparsity_metrics(active: jax.Array, segment_ids: jax.Array | None = None,
                     lengths=CLS_LENGTHS) -> dict[str, jax.Array]:
  """The aux metrics every expert FFN reports: {"metric/tls", "metric/cls<L>" for L in
  `lengths`, "metric/reuse", "metric/never_active", "metric/always_active"}, each a float32
  scalar (see the functions above)."""
  active = jax.lax.stop_gradient(active)
  metrics = {"metric/tls": token_level_sparsity(active, segment_ids)}
  for length, value in chunk_level_sparsities(active, segment_ids, lengths).items():
    metrics[f"metric/cls{length}"] = value
  metrics["metric/reuse"] = reuse_ratio(active, segment_ids)
  metrics["metric/never_active"], metrics["metric/always_active"] = static_experts(
      active, segment_ids)
  return metrics
