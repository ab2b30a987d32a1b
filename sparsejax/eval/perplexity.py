"""Long-document perplexity: the loss on the last tokens of long, coherent documents.

Synthetic retrieval says whether a model can find a needle; perplexity on the tail of a long
document says whether far context helps it predict real text. A document is the concatenation of
related files of the VALIDATION split (the files of one directory in sorted order, continuing
into the next directories when one is too short), cut to the target length in tokens. Only the
last `tail` tokens are scored, so the number depends on the long prefix before them: an attention
that drops far context (a sliding window, a poor block selection) shows up as a higher value.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.data.corpus import read_text, resolve_corpus
from sparsejax.layers.kv_cache import KVCache


def long_documents(tokenizer, length: int, num_docs: int, seed: int = 0, *,
                   corpus: str = "stdlib") -> list[np.ndarray]:
  """`num_docs` int32 arrays of exactly `length` tokens ([bos] + text), all different.

  Documents start at the first file of a directory (random order, seeded) and run through the
  sorted validation files; when there are fewer directory starts than documents asked for, any
  file may start one.
  """
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 2:
    raise ValueError(f"length must be an int >= 2, got length={length!r}")
  if isinstance(num_docs, bool) or not isinstance(num_docs, int) or num_docs < 1:
    raise ValueError(f"num_docs must be a positive int, got num_docs={num_docs!r}")
  files = sorted(resolve_corpus(corpus, "validation"))
  dir_starts = [i for i, f in enumerate(files)
                if i == 0 or os.path.dirname(f) != os.path.dirname(files[i - 1])]
  rng = np.random.default_rng([int(seed), 7919])
  others = [i for i in range(len(files)) if i not in set(dir_starts)]
  order = ([dir_starts[i] for i in rng.permutation(len(dir_starts))]
           + [others[i] for i in rng.permutation(len(others))])
  encoded: dict[int, list[int]] = {}
  docs = []
  for start in order:
    ids = [tokenizer.bos_id]
    for i in range(start, len(files)):
      if i not in encoded:
        encoded[i] = tokenizer.encode(read_text(files[i]).rstrip("\n") + "\n\n")
      ids.extend(encoded[i])
      if len(ids) >= length:
        docs.append(np.asarray(ids[:length], np.int32))
        break
    if len(docs) == num_docs:
      return docs
  raise ValueError(
      f"length={length}: the validation split of corpus={corpus!r} has only {len(docs)} "
      f"documents of that many tokens, {num_docs} asked for (lower num_docs or the length)")


@functools.partial(jax.jit, static_argnames=("graphdef", "tail"))
def _tail_nll_one_pass(graphdef, state, tokens, *, tail):
  """Summed NLL of the last `tail` tokens of each row, from one forward pass over the row."""
  model = nnx.merge(graphdef, state)
  logits, _, _ = model(tokens)
  logp = jax.nn.log_softmax(logits[:, -tail - 1:-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, -tail:, None], axis=-1).sum()


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _chunk_step(graphdef, state, cache, chunk, targets):
  """Feeds one chunk through the KV cache; per-position NLL of `targets` (the next tokens)."""
  model = nnx.merge(graphdef, state)
  logits, _, cache = model(chunk, segment_ids=jnp.ones_like(chunk), cache=cache)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], cache


def _tail_nll_chunked(model, tokens: np.ndarray, tail: int, chunk_size: int) -> float:
  """Same number as the one-pass path, with activations and logits bounded by `chunk_size`
  tokens at a time: the prefix is fed chunk by chunk through a KV cache."""
  cfg = model.config
  batch, length = tokens.shape
  graphdef, state = nnx.split(model)
  cache = KVCache.init(num_layers=cfg.num_layers, batch=batch, capacity=length,
                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       dtype=cfg.compute_dtype)
  # targets[t] = tokens[t + 1]; the last position predicts nothing (its NLL is discarded).
  targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
  total = 0.0
  for s in range(0, length, chunk_size):
    e = min(s + chunk_size, length)
    nll, cache = _chunk_step(graphdef, state, cache, jnp.asarray(tokens[:, s:e]),
                             jnp.asarray(targets[:, s:e]))
    lo = max(s, length - tail - 1)  # positions predicting the last `tail` tokens
    hi = min(e, length - 1)
    if lo < hi:
      total += float(np.asarray(nll)[:, lo - s:hi - s].sum())
  return total


def long_perplexity(model, tokenizer, lengths, tail: int = 256, num_docs: int = 4, seed: int = 0,
                    *, corpus: str = "stdlib", chunk_size: int | None = None) -> dict[int, float]:
  """{length: exp(mean NLL of the last `tail` tokens)} over `num_docs` long documents.

  `length` counts the bos token. With `chunk_size=None` each document is one forward pass (the
  model's own attention path, e.g. InfLLM-V2's sparse kernel); a chunk size feeds the document
  through the KV cache in pieces instead, for lengths whose full logits would not fit in memory.
  """
  lengths = list(lengths)
  if not lengths:
    raise ValueError("lengths must not be empty")
  if isinstance(tail, bool) or not isinstance(tail, int) or tail < 1:
    raise ValueError(f"tail must be a positive int, got tail={tail!r}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be None or a positive int, got chunk_size={chunk_size!r}")
  max_len = model.config.max_seq_len
  for length in lengths:
    if not isinstance(length, (int, np.integer)) or not tail < length <= max_len:
      raise ValueError(f"lengths: each must be an int in ({tail}, {max_len}] (tail < length <= "
                       f"the model's max_seq_len), got {length!r}")
  graphdef, state = nnx.split(model)
  out = {}
  for length in lengths:
    total = 0.0
    for doc in long_documents(tokenizer, int(length), num_docs, seed, corpus=corpus):
      row = doc[None, :]
      if chunk_size is None:
        total += float(_tail_nll_one_pass(graphdef, state, jnp.asarray(row), tail=tail))
      else:
        total += _tail_nll_chunked(model, row, tail, chunk_size)
    out[int(length)] = float(np.exp(total / (num_docs * tail)))
  return out
