"""KV-cache eviction: chunked prefill that evicts after every chunk, then decoding.

    config = EvictionConfig(scorer="snapkv", compression=8, chunk_size=1024, n_stabilizers=256,
                            n_sinks=4)
    new_tokens, stats = generate_with_eviction(model, prompts, config=config,
                                               max_new_tokens=64, return_stats=True)

The prompt is fed in chunks of `chunk_size` tokens. Each chunk walks the model's blocks (the
model's own norms, projections, FFNs and `sparsejax.ops.rope`), attends over each KV head's kept
entries plus the chunk (`eviction_cache.attend`), lets the scorer (`scorers.py`) score every
entry, and evicts each head down to its budget (`eviction_cache.evict`: top-b by score, the
`n_stabilizers` most recent and the `n_sinks` first tokens always kept). The cache holds
budget + chunk entries at most, whatever the prompt length. Locret prefills the last `local_len`
prompt tokens after the evicting chunks without eviction; then decoding either lets the cache
grow by max_new_tokens (`decode_mode="grow"`, the default, as the Locret code does) or evicts
back to the budget after every token (`"evict"`).

Batches of prompts of different lengths are right-padded: chunk c covers positions
[c * chunk, (c + 1) * chunk) of every row, padding tokens are never appended to the cache (each
(row, head) has its own length) and their queries are left out of every score.
"""
import dataclasses
import functools
import math
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.inference import eviction_cache
from sparsejax.inference.eviction_cache import POSITION_MODES, EvictingLayerKV
from sparsejax.inference.generate import check_prompts, cut_at_eos
from sparsejax.inference.sampling import sample_next
from sparsejax.inference.scorers import SCORERS, ScoreInputs

DECODE_MODES = ("grow", "evict")
POOLINGS = ("max", "avg")


@dataclasses.dataclass(frozen=True)
class EvictionConfig:
  """The eviction policy and its scorer.

  Exactly one of `budget` and `compression` is set:
    budget: entries kept per KV head: an int, a [kv_heads] sequence (each head its own budget)
      or a [num_layers][kv_heads] nested sequence.
    compression: budget = ceil(prompt width / compression) for every head (compression 1 keeps
      everything: full attention, chunked); the prompt width is the batch's padded width.
  Other fields:
    scorer: a name in `scorers.SCORERS` ("locret", "snapkv", "h2o", "streaming", "random").
    chunk_size: prefill chunk (Locret: 1024-3072); peak cache = budget + chunk entries per head.
    n_stabilizers: the most recent entries always kept (Locret: 2500 at b = 6000).
    n_sinks: the first tokens (positions < n_sinks) always kept (StreamingLLM: 4).
    position_mode: "original" (RoPE at each token's prompt position) or "contiguous" (positions
      re-assigned 0..n-1 per head after eviction, as the Locret code does).
    local_len: the last prompt tokens prefilled after eviction, without it (Locret's n_loc: 100).
    decode_mode: "grow" (decoded tokens are appended, no eviction) or "evict" (evict to the
      budget after every decoded token).
    snapkv_window / snapkv_kernel / snapkv_pooling: SnapKV's observation window, pooling kernel
      and pooling (32, 7, "max": the SnapKV LongBench setting ablation_c4096_w32_k7_maxpool; the
      repository's class defaults are kernel 5 with avg pooling).
    seed: the random scorer's seed.
  """
  scorer: str = "snapkv"
  budget: int | tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
  compression: float | None = None
  chunk_size: int = 1024
  n_stabilizers: int = 0
  n_sinks: int = 0
  position_mode: str = "original"
  local_len: int = 0
  decode_mode: str = "grow"
  snapkv_window: int = 32
  snapkv_kernel: int = 7
  snapkv_pooling: str = "max"
  seed: int = 0

  def __post_init__(self):
    def fail(field, expected):
      raise ValueError(f"EvictionConfig.{field} must be {expected}, got {getattr(self, field)!r}")

    def is_int(x, low):
      return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= low

    if self.scorer not in SCORERS:
      fail("scorer", f"one of {sorted(SCORERS)}")
    if (self.budget is None) == (self.compression is None):
      raise ValueError("EvictionConfig: set exactly one of budget and compression, got "
                       f"budget={self.budget!r}, compression={self.compression!r}")
    if self.budget is not None:
      try:
        arr = np.asarray(self.budget)
      except ValueError:  # ragged nesting
        arr = np.asarray([])
      if (arr.ndim > 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer)
          or arr.min() < 1):
        fail("budget", "a positive int, a [kv_heads] or a [num_layers][kv_heads] sequence of "
             "positive ints")
      object.__setattr__(self, "budget", int(arr) if arr.ndim == 0 else
                         tuple(map(tuple, arr.tolist())) if arr.ndim == 2 else
                         tuple(arr.tolist()))
    if self.compression is not None and (
        isinstance(self.compression, bool) or not isinstance(self.compression, (int, float))
        or not self.compression >= 1):
      fail("compression", "a number >= 1 (the prompt width over the budget)")
    for field, low in (("chunk_size", 1), ("n_stabilizers", 0), ("n_sinks", 0),
                       ("local_len", 0), ("snapkv_window", 1), ("seed", 0)):
      if not is_int(getattr(self, field), low):
        fail(field, f"an int >= {low}")
    if not is_int(self.snapkv_kernel, 1) or self.snapkv_kernel % 2 == 0:
      fail("snapkv_kernel", "an odd int >= 1 (pooling keeps the length)")
    for field, allowed in (("position_mode", POSITION_MODES), ("decode_mode", DECODE_MODES),
                           ("snapkv_pooling", POOLINGS)):
      if getattr(self, field) not in allowed:
        fail(field, f"one of {allowed}")
    if self.budget is not None:
      self._check_protected(int(np.min(self.budget)), "budget")

  def _check_protected(self, smallest_budget: int, source: str) -> None:
    if self.n_stabilizers + self.n_sinks > smallest_budget:
      raise ValueError(
          f"EvictionConfig: n_stabilizers ({self.n_stabilizers}) + n_sinks ({self.n_sinks}) "
          f"must not exceed the smallest budget ({smallest_budget}, from {source}): the always "
          "kept entries have to fit")

  def budgets(self, prompt_width: int, num_layers: int, num_kv_heads: int) -> np.ndarray:
    """The budget of every layer and KV head: int32 [num_layers, kv_heads]."""
    if self.budget is None:
      b = max(1, math.ceil(prompt_width / self.compression))
      self._check_protected(b, f"compression={self.compression} of width {prompt_width}")
      return np.full((num_layers, num_kv_heads), b, np.int32)
    arr = np.asarray(self.budget, np.int32)
    want = {0: (), 1: (num_kv_heads,), 2: (num_layers, num_kv_heads)}[arr.ndim]
    if arr.shape != want:
      raise ValueError(f"EvictionConfig.budget has shape {arr.shape}; the model needs {want} "
                       f"(num_layers={num_layers}, num_kv_heads={num_kv_heads})")
    return np.broadcast_to(arr, (num_layers, num_kv_heads)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class EvictionStats:
  """What one `generate_with_eviction` call allocated. peak_kv_bytes: all cache arrays (k, v,
  positions, scores, lengths of every layer; the whole batch), allocated once at `capacity`
  entries per (row, KV head) for the whole call."""
  peak_kv_bytes: int
  capacity: int
  chunk: int
  num_chunks: int
  budget: tuple  # [num_layers][kv_heads]


@dataclasses.dataclass
class PrefillResult:
  caches: tuple[EvictingLayerKV, ...]  # one per layer
  last_logits: jax.Array               # [batch, vocab] float32 at each prompt's last token
  lengths: np.ndarray                  # [batch] prompt lengths
  policy: dict[str, jax.Array]         # `_policy_arrays` of the call
  stats: EvictionStats


def _output_logits(model, x: jax.Array) -> jax.Array:
  """x [batch, d_model] -> [batch, vocab] float32: the model's final norm and output head
  (the same expression as `DecoderLM.__call__`, for one position per row)."""
  cfg = model.config
  x = model.final_norm(x)
  head = model.embed[...].T * cfg.d_model ** -0.5 if cfg.tie_embeddings else model.head[...]
  return jnp.einsum("bd,dv->bv", x, head.astype(cfg.compute_dtype),
                    preferred_element_type=jnp.float32)


def _trace_config(config: EvictionConfig) -> EvictionConfig:
  """The config with the fields that do not change the traced step (budget, stabilizers, sinks
  and seed are traced arrays; chunk and tail sizes are shapes; the decode mode is the `evict`
  argument) set to fixed values, so runs that differ only in them share one compilation."""
  return dataclasses.replace(config, budget=1, compression=None, chunk_size=1, n_stabilizers=0,
                             n_sinks=0, local_len=0, decode_mode="grow", seed=0)


def _policy_arrays(config: EvictionConfig, budgets: np.ndarray) -> dict[str, jax.Array]:
  return {"budgets": jnp.asarray(budgets, jnp.int32),
          "n_stabilizers": jnp.asarray(config.n_stabilizers, jnp.int32),
          "n_sinks": jnp.asarray(config.n_sinks, jnp.int32)}


def forward_step(model, heads, caches, tokens: jax.Array, start: jax.Array, n_valid: jax.Array,
                 policy: dict[str, jax.Array], rng: jax.Array, config: EvictionConfig,
                 evict: bool):
  """One step (a chunk, the local tail or a decoded token) through every block.

  Args:
    model: the `DecoderLM`; heads: the retaining heads or None; caches: one
      `EvictingLayerKV` per layer.
    tokens: [batch, T] (right-padded); start: [batch] original position of tokens[:, 0];
    n_valid: [batch] real tokens of each row in this step (0 for a row that has finished).
    policy: `_policy_arrays`: budgets [num_layers, kv_heads], n_stabilizers, n_sinks (traced,
      so changing them does not recompile); rng: key for the scorers; evict: evict after it.
    config: the scorer, position mode and scorer options.
  Returns:
    (logits [batch, vocab] at each row's last real token of the step, the new caches).
  """
  cfg = model.config
  steps = tokens.shape[1]
  t = jnp.arange(steps, dtype=jnp.int32)
  positions = start[:, None] + t
  query_valid = t[None, :] < n_valid[:, None]
  x = model.embed[...].astype(cfg.compute_dtype)[tokens]
  new_caches = []
  for i, block in enumerate(model.blocks):
    q, k, v = block.attn.project_qkv(block.attn_norm(x))
    layer, old = eviction_cache.append(caches[i], k, v, positions, n_valid)
    q_pos, k_pos = eviction_cache.rope_positions(layer, old, positions, config.position_mode)
    out, probs = eviction_cache.attend(q, layer, old, q_pos, k_pos, cfg.rope_base)
    x = x + block.attn.project_out(out)
    h, _ = block.ffn(block.ffn_norm(x), segment_ids=query_valid.astype(jnp.int32))
    x = x + h
    new_index = jnp.arange(layer.capacity)[None, None, :] - old[..., None]
    new_index = jnp.where((new_index >= 0) & (new_index < n_valid[:, None, None]), new_index, -1)
    inputs = ScoreInputs(layer=i, q=q, k=k, v=v,
                         probs=probs * query_valid[:, None, None, :, None].astype(probs.dtype),
                         scores=layer.scores, positions=layer.positions, new_index=new_index,
                         query_valid=query_valid, rng=jax.random.fold_in(rng, i), heads=heads)
    layer = layer.replace(scores=SCORERS[config.scorer](inputs, config).astype(jnp.float32))
    if evict:
      layer = eviction_cache.evict(layer, policy["budgets"][i], policy["n_stabilizers"],
                                   policy["n_sinks"])
    new_caches.append(layer)
  last = jnp.take_along_axis(x, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
  return _output_logits(model, last), tuple(new_caches)


def _prefill_step(graphdef, state, heads_graphdef, heads_state, caches, tokens, start, n_valid,
                  has_last, last_logits, policy, rng, *, config, evict):
  model = nnx.merge(graphdef, state)
  heads = None if heads_graphdef is None else nnx.merge(heads_graphdef, heads_state)
  logits, caches = forward_step(model, heads, caches, tokens, start, n_valid, policy, rng,
                                config, evict)
  return caches, jnp.where(has_last[:, None], logits, last_logits)


def _decode(graphdef, state, heads_graphdef, heads_state, caches, first_logits, lengths, policy,
            rng, score_rng, *, config, evict, max_new_tokens, temperature, top_p):
  model = nnx.merge(graphdef, state)
  heads = None if heads_graphdef is None else nnx.merge(heads_graphdef, heads_state)
  batch = lengths.shape[0]
  rng, sub = jax.random.split(rng)
  first = sample_next(first_logits, sub, temperature=temperature, top_p=top_p)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  ones = jnp.ones((batch,), jnp.int32)

  def body(i, carry):
    caches, out, rng = carry
    logits, caches = forward_step(model, heads, caches, out[:, i - 1][:, None], lengths + i - 1,
                                  ones, policy, jax.random.fold_in(score_rng, i), config, evict)
    rng, sub = jax.random.split(rng)
    nxt = sample_next(logits, sub, temperature=temperature, top_p=top_p)
    return caches, out.at[:, i].set(nxt), rng

  _, out, _ = jax.lax.fori_loop(1, max_new_tokens, body, (caches, out, rng))
  return out


@functools.cache
def _jitted(name: str):
  """The jitted step functions, built on first use: the cache buffers are donated (updated in
  place) except on the CPU backend, which cannot reuse them and would warn on every call."""
  fn, static = {"prefill": (_prefill_step, ("config", "evict")),
                "decode": (_decode, ("config", "evict", "max_new_tokens", "temperature",
                                     "top_p"))}[name]
  donate = ("caches",) if jax.default_backend() != "cpu" else ()
  return jax.jit(fn, static_argnames=("graphdef", "heads_graphdef") + static,
                 donate_argnames=donate)


def _check_prompts(cfg, prompts, pad_to, max_new_tokens) -> tuple[np.ndarray, int]:
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
  return check_prompts(cfg, prompts, max_new_tokens=max_new_tokens, pad_to=pad_to,
                       fn="prefill_with_eviction")


def _split_heads(config: EvictionConfig, heads):
  if config.scorer != "locret":
    return None, None  # only the locret scorer reads them
  if heads is None:
    raise ValueError("heads: scorer 'locret' needs the retaining heads (RetainingHeads, e.g. "
                     "from sparsejax.layers.retaining_heads.load_retaining_heads)")
  if not isinstance(heads, nnx.Module):
    raise ValueError(f"heads must be an nnx.Module (RetainingHeads), got {type(heads).__name__}")
  return nnx.split(heads)


def prefill_with_eviction(model, prompts: list[list[int]], *, config: EvictionConfig,
                          heads=None, decode_tokens: int = 0,
                          pad_to: int | None = None) -> PrefillResult:
  """Chunked prefill with eviction after every chunk, then the `local_len` tail without it.

  Args:
    model: a `DecoderLM` with dense attention.
    prompts: token-id lists, possibly of different lengths.
    config: the policy. heads: the retaining heads (scorer "locret" only).
    decode_tokens: tokens the caller will decode afterwards (sizes the cache for them).
    pad_to: the padded width (>= the longest prompt) that `compression` budgets are taken from;
      default: the longest prompt.
  Returns:
    A `PrefillResult`: per-layer caches of capacity about min(budget, prompt) + max(chunk,
    local_len + decode growth) entries per (row, KV head), each row's last-token logits, stats.
  """
  cfg = model.config
  if cfg.attention != "dense":
    raise ValueError(f"model.config.attention must be 'dense' (eviction attends densely over the "
                     f"kept entries), got {cfg.attention!r}")
  if not isinstance(config, EvictionConfig):
    raise ValueError(f"config must be an EvictionConfig, got {type(config).__name__}")
  lengths, width = _check_prompts(cfg, prompts, pad_to, decode_tokens)
  heads_graphdef, heads_state = _split_heads(config, heads)
  batch = len(prompts)
  budgets = config.budgets(width, cfg.num_layers, cfg.num_kv_heads)
  evict_end = np.maximum(lengths - config.local_len, 0)   # rows' evicting part: [0, evict_end)
  longest = int(evict_end.max())
  chunk = min(config.chunk_size, longest)
  num_chunks = math.ceil(longest / chunk) if chunk else 0
  # After an eviction a head holds <= min(budget, tokens so far); between two evictions it
  # takes a chunk, or the tail plus the decoded tokens (grow) / one decoded token (evict).
  most = int(budgets.max())
  grow = config.decode_mode == "grow"
  capacity = min(most, num_chunks * chunk) + max(chunk, config.local_len
                                                 + (decode_tokens if grow else 1))
  if not grow:
    capacity = max(capacity, min(most, num_chunks * chunk + config.local_len + decode_tokens) + 1)
  caches = tuple(EvictingLayerKV.init(batch=batch, num_kv_heads=cfg.num_kv_heads,
                                      capacity=capacity, head_dim=cfg.head_dim,
                                      dtype=cfg.compute_dtype) for _ in range(cfg.num_layers))
  stats = EvictionStats(eviction_cache.cache_bytes(caches), capacity, chunk, num_chunks,
                        tuple(map(tuple, budgets.tolist())))
  graphdef, state = nnx.split(model)
  policy = _policy_arrays(config, budgets)
  base_rng = jax.random.key(config.seed)
  last_logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
  step = functools.partial(_jitted("prefill"), graphdef=graphdef, state=state,
                           heads_graphdef=heads_graphdef, heads_state=heads_state,
                           policy=policy, config=_trace_config(config))

  tokens = np.zeros((batch, max(num_chunks * chunk, 1)), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :evict_end[i]] = p[:evict_end[i]]
  for c in range(num_chunks):
    s = c * chunk
    n_valid = np.clip(evict_end - s, 0, chunk).astype(np.int32)
    has_last = (n_valid > 0) & (s + n_valid == lengths)
    caches, last_logits = step(
        caches=caches, tokens=jnp.asarray(tokens[:, s:s + chunk]),
        start=jnp.full((batch,), s, jnp.int32), n_valid=jnp.asarray(n_valid),
        has_last=jnp.asarray(has_last), last_logits=last_logits,
        rng=jax.random.fold_in(base_rng, c), evict=True)
  if config.local_len:
    tail = np.zeros((batch, config.local_len), np.int32)
    for i, p in enumerate(prompts):
      tail[i, :lengths[i] - evict_end[i]] = p[evict_end[i]:]
    caches, last_logits = step(
        caches=caches, tokens=jnp.asarray(tail), start=jnp.asarray(evict_end, jnp.int32),
        n_valid=jnp.asarray(lengths - evict_end, jnp.int32), has_last=jnp.ones((batch,), bool),
        last_logits=last_logits, rng=jax.random.fold_in(base_rng, num_chunks), evict=False)
  return PrefillResult(caches, last_logits, lengths, policy, stats)


def generate_with_eviction(model, prompts: list[list[int]], *, config: EvictionConfig,
                           max_new_tokens: int, heads=None, temperature: float = 0.0,
                           top_p: float = 1.0, rng: jax.Array | None = None,
                           eos_id: int | None = None, pad_to: int | None = None,
                           return_stats: bool = False):
  """Completes each prompt under the eviction policy (the interface of `generate`).

  Args:
    model, prompts, config, heads, pad_to: as `prefill_with_eviction`.
    max_new_tokens, temperature, top_p, rng, eos_id: as `sparsejax.inference.generate`.
    return_stats: also return the call's `EvictionStats` (peak KV bytes).
  Returns:
    The new tokens of each prompt (cut before the first `eos_id`); with `return_stats`, the
    pair (tokens, stats).
  """
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  pre = prefill_with_eviction(model, prompts, config=config, heads=heads,
                              decode_tokens=max_new_tokens, pad_to=pad_to)
  graphdef, state = nnx.split(model)
  heads_graphdef, heads_state = _split_heads(config, heads)
  score_rng = jax.random.fold_in(jax.random.key(config.seed), pre.stats.num_chunks + 1)
  out = _jitted("decode")(
      graphdef, state, heads_graphdef, heads_state, pre.caches, pre.last_logits,
      jnp.asarray(pre.lengths), pre.policy, jax.random.key(0) if rng is None else rng, score_rng,
      config=_trace_config(config), evict=config.decode_mode == "evict",
      max_new_tokens=max_new_tokens,
      temperature=float(temperature), top_p=float(top_p))
  results = cut_at_eos(out, eos_id)
  return (results, pre.stats) if return_stats else results


class EvictingGenerator:
  """A `generate`-compatible function for `sparsejax.eval.evaluate(generate_fn=...)`; records
  every call's stats so a sweep can report the peak KV bytes."""

  def __init__(self, config: EvictionConfig, heads=None):
    if not isinstance(config, EvictionConfig):
      raise ValueError(f"config must be an EvictionConfig, got {type(config).__name__}")
    _split_heads(config, heads)  # fails early when locret has no heads
    self.config, self.heads, self.stats = config, heads, []

  def __call__(self, model, prompts, *, max_new_tokens: int, eos_id: int | None = None,
               pad_to: int | None = None, **sampling) -> list[list[int]]:
    out, stats = generate_with_eviction(model, prompts, config=self.config, heads=self.heads,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        pad_to=pad_to, return_stats=True, **sampling)
    self.stats.append(stats)
    return out

  @property
  def peak_kv_bytes(self) -> int:
    return max((s.peak_kv_bytes for s in self.stats), default=0)
