"""NOSA: native and offloadable sparse attention (arXiv 2510.13602): the pure-jnp reference.

NOSA is InfLLM-V2 (`sparsejax.ops.infllmv2`: same compressed keys, blocks of 64, per-token block
selection) with its selection split in two, so that adjacent decoding steps share most of their
blocks and a KV cache offloaded to host memory needs few transfers:

  query-aware   the `query_topk` blocks InfLLM-V2's selection picks (its scores, with the init
                and local blocks forced): `select_blocks` at topk = query_topk.
  query-agnostic the remaining topk - query_topk slots go to the eligible blocks with the highest
                eviction score, which does not depend on the query.

Eviction head (one per layer): per token and KV head, s = A * softplus(W_delta . v), where v is
the token's value vector over all KV heads (values carry no RoPE), W_delta maps the concatenated
values to one score per KV head and A is a per-KV-head scale initialised to 0. So a NOSA model
starts as InfLLM-V2 with a query-agnostic part that prefers the oldest blocks (every score ties
at 0; ties go to the lower block index), and W_delta is trained only once A moves.

The score is trained through the attention itself: it is an additive bias on the logits of every
selected key, softmax(q.k / sqrt(d) + s_key), for all the query heads of the KV head. Selection is
discrete (no gradient), so the head learns only from the bias.

Block eviction score: the same two pools as the query-aware score, over the per-token scores
instead of probabilities: the mean over compression windows (compress_window tokens every
compress_stride), then the max over the windows overlapping each block. It is one row per KV
head, shared by every query.

What the public reference code does (thunlp/NOSA, read, not copied), and where this differs:
  * Eviction head: `benchmarks/Efficiency/proxy_modeling_nosa.py` (the Hugging Face proxy of the
    Megatron-trained model): `A = zeros(num_kv_heads)`, `delta = Linear(num_kv_heads * head_dim ->
    num_kv_heads, bias=False)` on the value states, score `A * softplus(delta(v))`; the same
    formula in the inference system (nosi/nosa_llama.py, nosi/nosa_linear.py).
  * Bias: the proxy model attends with `v * exp(s)` and divides by the attention of `exp(s)`,
    which is softmax(q.k / sqrt(d) + s) over the selected keys: the bias is added after the
    1/sqrt(d) scaling, as here. (The inference system's CUDA kernel adds it before the scaling,
    i.e. s / sqrt(d); we follow the training path.)
  * Split: the proxy model takes the InfLLM-V2 top-k at 1 init + 16 local + 16 = 33 blocks, sets
    those to +inf in the pooled eviction scores and takes the top 64 of them, future blocks
    excluded: `query_topk` = 33 and `topk` = 64 here, both counting the forced blocks.
  * Local window: its max-pool kernel forces q_block - 16 <= j <= q_block, 17 blocks with the
    query's own: `local_blocks` = 17 here (this library counts the query's own block).
  * Pooling: mean over windows of 32 every 16 tokens and max-pool kernel 5, stride 4, padding 1,
    per document (varlen). A packed row here is pooled as one sequence: windows that straddle two
    documents are left out, and a block that holds two documents' tokens scores the best of both
    documents' windows; eligibility (a block holding a key of the query's document, none after
    its own block) is InfLLM-V2's. The proxy pools without compressed-level causality; so does
    this module, which is exact because local_blocks >= 2 is required: the only windows that reach
    past a query's position overlap its own block or the one before, both forced.
  * Dense fallback: the proxy model has dense_len = 0 (always sparse); so does NOSAConfig, since
    the dense kernels here take no bias.

Shapes follow `sparsejax.ops.infllmv2`: q [b, t, heads, d]; k, v [b, kv_len, kv_heads, d];
eviction scores float32 [b, kv_len, kv_heads].
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.ops.infllmv2 import (InfLLMv2Config, _check_attention_inputs, block_scores,
                                    check_key_bias, compress_keys, eligible_blocks,
                                    max_pool_blocks, num_windows, select_blocks,
                                    select_decode_blocks, sparse_attention, top_blocks)

_BIG = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class NOSAConfig(InfLLMv2Config):
  """InfLLM-V2's hyper-parameters with the NOSA split (defaults: thunlp/NOSA's 1B model)."""
  local_blocks: int = 17        # the query's block and the 16 before it (1024 tokens back)
  topk: int = 64                # total blocks per query and KV head
  query_topk: int = 33          # of which chosen by InfLLM-V2's score: 1 init + 17 local + 15
  dense_len: int = 0            # always sparse

  def __post_init__(self):
    super().__post_init__()
    q = self.query_topk
    if not isinstance(q, (int, np.integer)) or isinstance(q, bool):
      raise ValueError(f"NOSAConfig: query_topk must be an int, got {q!r}")
    if not self.init_blocks + self.local_blocks <= q <= self.topk:
      raise ValueError(
          f"NOSAConfig: query_topk={q} must lie between init_blocks + local_blocks = "
          f"{self.init_blocks + self.local_blocks} and topk={self.topk}")
    if self.local_blocks < 2:
      raise ValueError(
          f"NOSAConfig: local_blocks must be >= 2 (the windows that reach past a query overlap "
          f"its own block and the one before, which must be forced), got {self.local_blocks}")
    if self.dense_len != 0:
      raise ValueError(
          f"NOSAConfig: dense_len must be 0 (NOSA is always sparse; the dense path has no "
          f"eviction bias), got {self.dense_len}")

  def query_aware(self) -> InfLLMv2Config:
    """The InfLLM-V2 selection of the query-aware part (topk = query_topk)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(InfLLMv2Config)}
    return InfLLMv2Config(**{**fields, "topk": self.query_topk})


def eviction_scores(v: jax.Array, scale: jax.Array, proj: jax.Array) -> jax.Array:
  """The eviction head: float32 [b, s, kv_heads] = scale * softplus(proj . v).

  v [b, s, kv_heads, head_dim] (values); proj [kv_heads, head_dim, kv_heads] (W_delta: the
  values of all KV heads in, one score per KV head out); scale [kv_heads] (A)."""
  if v.ndim != 4:
    raise ValueError(f"eviction_scores: v must be [batch, seq, kv_heads, head_dim], got shape "
                     f"{v.shape}")
  kvh, d = v.shape[2:]
  if proj.shape != (kvh, d, kvh):
    raise ValueError(f"eviction_scores: proj must be [kv_heads, head_dim, kv_heads] = "
                     f"{(kvh, d, kvh)}, got {proj.shape}")
  if scale.shape != (kvh,):
    raise ValueError(f"eviction_scores: scale must be [kv_heads] = {(kvh,)}, got {scale.shape}")
  pre = jnp.einsum("bskd,kdo->bso", v.astype(jnp.float32), proj.astype(jnp.float32))
  return scale.astype(jnp.float32) * jax.nn.softplus(pre)


def block_eviction_scores(scores: jax.Array, cfg: NOSAConfig, *,
                          segment_ids: jax.Array | None = None,
                          kv_lengths: jax.Array | None = None) -> jax.Array:
  """Pooled eviction scores float32 [b, kv_heads, n_blocks] (module docstring): the mean over
  each compression window, then the max over the windows overlapping each block. Windows that
  straddle two documents (segment_ids [b, kv_len]) or reach past kv_lengths [b] are left out; a
  block without a window scores the lowest finite float (eligible, ranked last)."""
  if scores.ndim != 3:
    raise ValueError(f"block_eviction_scores: scores must be [batch, kv_len, kv_heads], got "
                     f"shape {scores.shape}")
  b, kv_len, _ = scores.shape
  window, stride = cfg.compress_window, cfg.compress_stride
  means = compress_keys(scores.astype(jnp.float32)[..., None], window=window,
                        stride=stride)[..., 0]                      # [b, c, kvh]
  c = num_windows(kv_len, window, stride)
  keep = jnp.ones((b, c), bool)
  if kv_lengths is not None:
    last = np.arange(c) * stride + window - 1
    lengths = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32).reshape(-1), (b,))
    keep &= jnp.asarray(last)[None, :] < lengths[:, None]
  if segment_ids is not None:
    wseg = segment_ids[:, np.arange(c)[:, None] * stride + np.arange(window)[None, :]]
    keep &= jnp.all(wseg == wseg[:, :, :1], axis=-1)
  means = jnp.where(keep[:, :, None], means, -jnp.inf)
  n_blocks = -(-kv_len // cfg.block_size)
  return max_pool_blocks(jnp.transpose(means, (0, 2, 1)), cfg, n_blocks=n_blocks, empty=-_BIG)


def agnostic_keys(query_idx: jax.Array, query_valid: jax.Array, evict_blocks: jax.Array,
                  eligible: jax.Array) -> jax.Array:
  """Ranking keys of the final top-k, float32 [b, t, kv_heads, n_blocks]: +inf for the
  query-aware blocks (query_idx / query_valid [b, t, kvh, query_topk]), the block eviction
  score (evict_blocks [b, kvh, n_blocks]) for the other eligible blocks (eligible bool
  [b, t, n_blocks]), -inf for the rest."""
  n_blocks = evict_blocks.shape[-1]
  # A scatter of the chosen ids, not a [.., query_topk, n_blocks] compare: at 128k that compare
  # is 131072 x 2 x 33 x 2048 = 1.8e10 elements. Unused slots land in a dropped extra column.
  rows = query_idx.reshape(-1, query_idx.shape[-1])
  rows = jnp.where(query_valid.reshape(rows.shape), rows, n_blocks)
  chosen = jnp.zeros((rows.shape[0], n_blocks + 1), bool)
  chosen = chosen.at[jnp.arange(rows.shape[0])[:, None], rows].set(True)
  chosen = chosen[:, :n_blocks].reshape(*query_idx.shape[:-1], n_blocks)  # [b, t, kvh, nb]
  score = jnp.clip(jnp.nan_to_num(evict_blocks, nan=-_BIG), -_BIG, _BIG)[:, None]
  return jnp.where(chosen, jnp.inf, jnp.where(eligible[:, :, None], score, -jnp.inf))


def nosa_select_blocks(q: jax.Array, k: jax.Array, evict: jax.Array, cfg: NOSAConfig, *,
                       segment_ids=None, kv_segment_ids=None, q_start=None, kv_lengths=None,
                       top_blocks_fn=None, query_aware_fn=None) -> tuple[jax.Array, jax.Array]:
  """The NOSA selection: (block_idx int32, block_valid bool) [b, t, kv_heads, topk], valid
  slots first and ascending, then -1 (InfLLM-V2's `select_blocks` format). evict: the eviction
  scores [b, kv_len, kv_heads] (`eviction_scores`). No gradient.
  top_blocks_fn(key, topk) may stand in for `top_blocks` (the top-k kernel), and
  query_aware_fn(q, k, cfg.query_aware()) -> (idx, valid) for the query-aware selection (the
  scoring kernels); both must give the reference's blocks."""
  q, k, evict = (jax.lax.stop_gradient(x) for x in (q, k, evict))
  kw = dict(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_start=q_start)
  b, t = q.shape[:2]
  kv_len = k.shape[1]
  aware = cfg.query_aware()
  if query_aware_fn is None:
    scores = block_scores(q, k, aware, kv_lengths=kv_lengths, **kw)
    query_idx, query_valid = select_blocks(scores, aware, q_len=t, kv_len=kv_len,
                                           top_blocks_fn=top_blocks_fn, **kw)
  else:
    query_idx, query_valid = query_aware_fn(q, k, aware)
  return _add_query_agnostic(query_idx, query_valid, evict, cfg, kv_len=kv_len,
                             kv_lengths=kv_lengths, top_blocks_fn=top_blocks_fn, **kw)


def _add_query_agnostic(query_idx, query_valid, evict, cfg, *, kv_len, segment_ids,
                        kv_segment_ids, q_start, kv_lengths, top_blocks_fn):
  """The final top-k: the query-aware blocks, then the best pooled eviction scores."""
  b, t = query_idx.shape[:2]
  kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
  pooled = block_eviction_scores(evict, cfg, segment_ids=kv_seg, kv_lengths=kv_lengths)
  eligible = eligible_blocks(cfg, batch=b, q_len=t, kv_len=kv_len, q_start=q_start,
                             segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  key = agnostic_keys(query_idx, query_valid, pooled, eligible)
  return (top_blocks_fn or top_blocks)(key, cfg.topk)


def nosa_select_decode_blocks(q: jax.Array, kc: jax.Array, evict: jax.Array, cfg: NOSAConfig, *,
                              kv_len: int, q_start: jax.Array, kc_coarse=None, segment_ids=None,
                              kv_segment_ids=None, top_blocks_fn=None,
                              selection_keys_fn=None) -> tuple[jax.Array, jax.Array]:
  """`nosa_select_blocks` for one query token per row at q_start [b] from a cache's compressed
  keys (InfLLM-V2's `select_decode_blocks` at query_topk, whose `selection_keys_fn` may be the
  decode kernels) and its per-token eviction scores evict [b, kv_len, kv_heads] (keys [0,
  q_start] filled): [b, 1, kv_heads, topk]."""
  b = q.shape[0]
  q_start = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32).reshape(-1), (b,))
  query_idx, query_valid = select_decode_blocks(
      q, kc, cfg.query_aware(), kv_len=kv_len, q_start=q_start, kc_coarse=kc_coarse,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, top_blocks_fn=top_blocks_fn,
      selection_keys_fn=selection_keys_fn)
  return _add_query_agnostic(query_idx, query_valid, jax.lax.stop_gradient(evict), cfg,
                             kv_len=kv_len, segment_ids=segment_ids,
                             kv_segment_ids=kv_segment_ids, q_start=q_start,
                             kv_lengths=q_start + 1, top_blocks_fn=top_blocks_fn)


def nosa_attention(q: jax.Array, k: jax.Array, v: jax.Array, evict: jax.Array, cfg: NOSAConfig,
                   *, segment_ids=None, kv_segment_ids=None, q_start=None,
                   kv_lengths=None) -> jax.Array:
  """The full method: select (`nosa_select_blocks`), then block-sparse attention with the
  eviction scores as the keys' logit bias. [b, t, heads, d] in q.dtype; differentiable in q, k,
  v and evict (through the bias only)."""
  fn = "nosa_attention"
  if not isinstance(cfg, NOSAConfig):
    raise ValueError(f"{fn}: cfg must be a NOSAConfig, got {type(cfg).__name__}")
  _check_attention_inputs(fn, q, k, v, segment_ids, kv_segment_ids, q_start, kv_lengths)
  check_key_bias(fn, evict, k)
  kw = dict(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_start=q_start,
            kv_lengths=kv_lengths)
  block_idx, block_valid = nosa_select_blocks(q, k, evict, cfg, **kw)
  return sparse_attention(q, k, v, block_idx, block_valid, cfg, key_bias=evict, **kw)


def nosa_decode(q: jax.Array, k: jax.Array, v: jax.Array, kc: jax.Array, evict: jax.Array,
                cfg: NOSAConfig, *, q_start: jax.Array, kc_coarse=None, segment_ids=None,
                kv_segment_ids=None) -> jax.Array:
  """One decode step from a cache's compressed keys and eviction scores: [b, 1, heads, d].
  Equals `nosa_attention(q, k, v, evict, cfg, q_start=q_start, kv_lengths=q_start + 1, ...)`
  whenever kc agrees with `compress_keys(k)` on the windows the queries see."""
  b, kv_len = q.shape[0], k.shape[1]
  q_start = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32).reshape(-1), (b,))
  block_idx, block_valid = nosa_select_decode_blocks(
      q, kc, evict, cfg, kv_len=kv_len, q_start=q_start, kc_coarse=kc_coarse,
      segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  return sparse_attention(q, k, v, block_idx, block_valid, cfg, key_bias=evict,
                          segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                          q_start=q_start, kv_lengths=q_start + 1)
