"""Batched generation: one prefill over right-padded prompts, then a jitted decode loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.inference.sampling import sample_next
from sparsejax.layers.kv_cache import KVCache


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None, eos_id: int | None = None,
             pad_id: int = 0, pad_to: int | None = None) -> list[list[int]]:
  """Completes each prompt (a list of token ids; prompts may differ in length).

  Returns the new tokens of each prompt, cut after the first `eos_id` when one is given.
  The KV cache holds max(prompt length) + max_new_tokens slots; each row writes at its own
  offset, so a short prompt's padding is overwritten by its continuation. `pad_to` pins the
  padded prompt width (>= the longest prompt), so batches of slightly different prompt lengths
  reuse one compiled prefill and decode loop.
  """
  cfg = model.config
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  lengths, width = check_prompts(cfg, prompts, max_new_tokens=max_new_tokens, pad_to=pad_to,
                                 fn="generate")
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  segment_ids = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  out = _generate_jit(graphdef, state, jnp.asarray(tokens), jnp.asarray(segment_ids),
                      jnp.asarray(lengths), rng, max_new_tokens=max_new_tokens,
                      temperature=float(temperature), top_p=float(top_p))
  return cut_at_eos(out, eos_id)


def cut_at_eos(tokens, eos_id: int | None) -> list[list[int]]:
  """[batch, new] generated ids -> one list per row, cut before its first eos_id (if given)."""
  results = []
  for row in np.asarray(tokens).tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    results.append(row)
  return results


def check_prompts(cfg, prompts, *, max_new_tokens: int, pad_to: int | None,
                  fn: str) -> tuple[np.ndarray, int]:
  """Checks a batch of prompts (lists of token ids) against the model; returns (lengths int32
  [batch], the padded width: the longest prompt, or pad_to). `fn` names the caller in errors."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError(f"{fn}: prompts must be a non-empty list of non-empty token lists")
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = int(lengths.max())
  if pad_to is not None:
    if pad_to < width:
      raise ValueError(f"{fn}: pad_to={pad_to} is shorter than the longest prompt ({width})")
    width = pad_to
  if width + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
        f"{fn}: longest prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds "
        f"ModelConfig.max_seq_len={cfg.max_seq_len}")
  for i, p in enumerate(prompts):
    if min(p) < 0 or max(p) >= cfg.vocab_size:
      raise ValueError(f"{fn}: prompt {i} has token ids outside [0, {cfg.vocab_size})")
  return lengths, width


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate_jit(graphdef, state, tokens, segment_ids, lengths, rng, *, max_new_tokens,
                  temperature, top_p):
  model = nnx.merge(graphdef, state)
  cfg = model.config
  batch, width = tokens.shape
  # InfLLM-V2 models also cache their compressed keys, kept up to date on every write.
  cache = KVCache.for_model(cfg, batch=batch, capacity=width + max_new_tokens)
  logits, _, cache = model(tokens, segment_ids=segment_ids, cache=cache)
  # Padding slots get overwritten by the continuation. Compressed-key windows computed over the
  # padding end past the real length, so no query sees them before the write of their last
  # token recomputes them (`sparsejax.ops.infllmv2.update_compressed_keys`).
  cache = cache.replace(lengths=lengths)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  rng, sub = jax.random.split(rng)
  first = sample_next(last, sub, temperature=temperature, top_p=top_p)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def body(i, carry):
    cache, out, rng = carry
    prev = out[:, i - 1][:, None]
    logits, _, cache = model(prev, positions=cache.lengths[:, None],
                             segment_ids=jnp.ones_like(prev), cache=cache)
    rng, sub = jax.random.split(rng)
    nxt = sample_next(logits[:, 0], sub, temperature=temperature, top_p=top_p)
    return cache, out.at[:, i].set(nxt), rng

  _, out, _ = jax.lax.fori_loop(1, max_new_tokens, body, (cache, out, rng))
  return out
