"""Does InfLLM-V2's block selection find the needle? A probe for one trained model.

A sparse model can miss a needle for two different reasons: its selection (compressed keys,
group softmax, max-pool, top-k) does not pick the needle's block, or it picks it and the
attention inside the selected blocks still answers wrong. Exact-match scores cannot tell the two
apart; this probe measures the first directly.

For a prompt whose needle spans known token positions, and for each query position asked about
(the last prompt token, which predicts the first answer token, and the teacher-forced answer
tokens after it), it reports per layer and KV head:
  selected        the needle's block is among the blocks InfLLM-V2 selects for that query (a
                  forced block counts: the needle is then inside the init or local window);
  forced          the needle's block is an init or local block (selection had nothing to do);
  selection_rank  the needle block's rank by InfLLM-V2's block score among the eligible blocks
                  that are not forced (0 = the best; a needle inside a forced block gets 0);
  attention_rank  the same rank by the exact attention: the probability mass that the group's
                  query heads (summed, as stage 2 sums) give each block under dense softmax;
  attention_mass  that mass on the needle's block divided by the group size (a mean over the
                  query heads, in [0, 1]).
attention_rank is what an oracle selection with the model's own dense attention would do, so
"attention_rank small, selection_rank large" says the compressed scores lose the needle, and
"both large" says this layer does not look at the needle from this query at all.

The needle blocks are the blocks holding any token of any occurrence of the answer string in the
prompt (the passkey needle states its key twice); a rank is the best over them. The forward pass
runs the model with its own attention, so the q and k probed are the ones that model computes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.model import backbone_qkv
from sparsejax.ops.infllmv2 import InfLLMv2Config, block_scores, select_blocks
from sparsejax.ops.rope import apply_rope


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  """Token ids with bos, the positions of the needle's tokens, and the queries to probe."""
  tokens: np.ndarray          # int [t]
  needle_positions: np.ndarray  # int [n], token positions of the answer inside the prompt
  query_positions: np.ndarray   # int [m], the positions whose selection is probed


def needle_prompt(tokenizer, prompt: str, answers, answer_tokens: int | None = None
                  ) -> NeedlePrompt:
  """[bos] prompt answer, with the needle located by the occurrences of `answers` in the prompt.

  The probed queries are the last prompt token and the first `answer_tokens` - 1 answer tokens
  (teacher forcing; default: all of the answer but its last token). Positions are found by
  encoding the prompt's prefix, exact for a byte tokenizer and off by at most a merge for a BPE,
  which the 64-token block absorbs.
  """
  if isinstance(answers, str) or not answers:
    raise ValueError(f"answers must be a non-empty sequence of strings, got {answers!r}")
  positions = []
  for ans in answers:
    start = prompt.find(ans)
    while start >= 0:
      first = 1 + len(tokenizer.encode(prompt[:start]))
      last = 1 + len(tokenizer.encode(prompt[:start + len(ans)]))
      positions.extend(range(first, max(first + 1, last)))
      start = prompt.find(ans, start + 1)
  if not positions:
    raise ValueError(f"none of the answers {list(answers)} occurs in the prompt: the probe needs "
                     "a task whose needle states its answer (passkey, multi_key, ...)")
  prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  answer_ids = tokenizer.encode(" " + answers[0])
  n_answer = len(answer_ids) if answer_tokens is None else int(answer_tokens)
  if not 1 <= n_answer <= len(answer_ids):
    raise ValueError(f"answer_tokens must be in [1, {len(answer_ids)}], got {answer_tokens!r}")
  tokens = np.asarray(prompt_ids + answer_ids[:n_answer - 1], np.int32)
  queries = np.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + n_answer)
  return NeedlePrompt(tokens, np.unique(np.asarray(positions)), queries)


def _rank(scores: np.ndarray, candidates: np.ndarray, targets: np.ndarray) -> int:
  """Best rank (0 = highest score, ties to the lower index) of any target among candidates."""
  order = sorted(np.flatnonzero(candidates), key=lambda j: (-scores[j], j))
  where = {j: r for r, j in enumerate(order)}
  return int(min(where[j] for j in targets if j in where))


@functools.partial(jax.jit, static_argnames=("n", "cfg"))
def _layer_scores(q: jax.Array, k: jax.Array, start: jax.Array, n: int, cfg: InfLLMv2Config):
  """Block scores, the selection and the exact attention mass per block of the n queries at
  positions start.. start + n - 1 of q [t, heads, d] against k [t, kv_heads, d] (causal: the
  keys after a query, padding included, do not count)."""
  t, heads, d = q.shape
  kvh = k.shape[1]
  group = heads // kvh
  q_start = start.reshape(1)
  qs = jax.lax.dynamic_slice_in_dim(q, start, n, axis=0)
  scores = block_scores(qs[None], k[None], cfg, q_start=q_start)[0]   # [n, kvh, nb]
  idx, valid = select_blocks(scores[None], cfg, q_len=n, kv_len=t, q_start=q_start)
  qg = qs.astype(jnp.float32).reshape(n, kvh, group, d)
  logits = jnp.einsum("nkgd,tkd->nkgt", qg, k.astype(jnp.float32)) / math.sqrt(d)
  causal = jnp.arange(t)[None, :] <= (start + jnp.arange(n))[:, None]     # [n, t]
  probs = jax.nn.softmax(jnp.where(causal[:, None, None], logits, -jnp.inf), axis=-1)
  nb = scores.shape[-1]
  summed = jnp.pad(probs.sum(axis=2), ((0, 0), (0, 0), (0, nb * cfg.block_size - t)))
  mass = summed.reshape(n, kvh, nb, cfg.block_size).sum(-1)               # [n, kvh, nb]
  return scores, idx[0], valid[0], mass


def probe_layer(q: jax.Array, k: jax.Array, needle_blocks: np.ndarray,
                query_positions: np.ndarray, cfg: InfLLMv2Config) -> dict[str, np.ndarray]:
  """One layer's probe. q [t, heads, d], k [t, kv_heads, d] post-RoPE (one sequence, no padding);
  query_positions consecutive, all at or after the first needle block. Tokens after the last
  query (padding) change nothing.

  Returns arrays [num_queries, kv_heads]: selected, forced (bool), selection_rank,
  attention_rank (int), attention_mass (float).
  """
  query_positions = np.asarray(query_positions)
  first, n = int(query_positions[0]), len(query_positions)
  if np.any(np.diff(query_positions) != 1) or first < 0 or first + n > q.shape[0]:
    raise ValueError(f"query_positions must be consecutive positions below {q.shape[0]}, got "
                     f"{query_positions.tolist()}")
  group = q.shape[1] // k.shape[1]
  scores, idx, valid, mass = map(np.asarray, _layer_scores(
      q, k, jnp.asarray(first, jnp.int32), n, cfg))
  out = {name: [] for name in ("selected", "forced", "selection_rank", "attention_rank",
                               "attention_mass")}
  blocks = np.arange(scores.shape[-1])
  for i, p in enumerate(map(int, query_positions)):
    q_block = p // cfg.block_size
    init = blocks < cfg.init_blocks
    local = (blocks <= q_block) & (blocks > q_block - cfg.local_blocks)
    free = (blocks <= q_block) & ~init & ~local
    targets = needle_blocks[needle_blocks <= q_block]
    if targets.size == 0:
      raise ValueError(f"query position {p} lies before the needle (blocks {needle_blocks})")
    forced = bool(np.any(init[targets] | local[targets]))
    row = {name: [] for name in out}
    for h in range(scores.shape[1]):
      chosen = set(idx[i, h][valid[i, h]].tolist())
      row["selected"].append(any(int(j) in chosen for j in targets))
      row["forced"].append(forced)
      row["selection_rank"].append(0 if forced else _rank(scores[i, h], free, targets))
      row["attention_rank"].append(0 if forced else _rank(mass[i, h], free, targets))
      row["attention_mass"].append(float(mass[i, h, targets].sum() / group))
    for name in out:
      out[name].append(row[name])
  return {name: np.asarray(v) for name, v in out.items()}


def probe_model(model, prompt: NeedlePrompt, cfg: InfLLMv2Config,
                pad_to: int = 256) -> list[dict[str, np.ndarray]]:
  """`probe_layer` for every layer of `model` (a DecoderLM) on one prompt, from one jitted
  forward pass with the model's own attention. The tokens are padded at the end to a multiple of
  `pad_to`, so prompts of about one length share the compiled programs; causal attention keeps
  the padding out of every probed query."""
  t = len(prompt.tokens)
  padded = np.zeros(-(-t // pad_to) * pad_to, np.int32)
  padded[:t] = prompt.tokens
  tokens = jnp.asarray(padded)[None]
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  needle_blocks = np.unique(prompt.needle_positions // cfg.block_size)
  layers = []
  for q, k, _ in rotated_qkv(model, tokens, positions):
    layers.append(probe_layer(q[0], k[0], needle_blocks, prompt.query_positions, cfg))
  return layers


@nnx.jit
def rotated_qkv(model, tokens, positions):
  """Post-RoPE q, k (and v, which RoPE leaves alone) of every layer, in one jitted pass."""
  base = model.config.rope_base
  return [(apply_rope(q, positions, base), apply_rope(k, positions, base), v)
          for q, k, v in backbone_qkv(model, tokens, positions)]


def summarize(results: list[list[dict[str, np.ndarray]]], free_slots: int) -> list[dict]:
  """Per layer, over prompts x queries x KV heads: the fraction selected, the fraction forced,
  the median ranks, the fraction an oracle (attention_rank < free_slots) would select, and the
  mean attention mass. `results[i]` is `probe_model`'s output for prompt i."""
  if not results:
    raise ValueError("summarize needs at least one prompt's results")
  rows = []
  for layer in range(len(results[0])):
    cat = {name: np.concatenate([r[layer][name].reshape(-1) for r in results])
           for name in results[0][layer]}
    unforced = ~cat["forced"]
    rows.append({
        "layer": layer,
        "cases": int(cat["selected"].size),
        "selected": float(cat["selected"].mean()),
        "forced": float(cat["forced"].mean()),
        "selected_unforced": (float(cat["selected"][unforced].mean()) if unforced.any()
                              else None),
        "oracle_selected_unforced": (float((cat["attention_rank"][unforced] < free_slots).mean())
                                     if unforced.any() else None),
        "median_selection_rank": (float(np.median(cat["selection_rank"][unforced]))
                                  if unforced.any() else None),
        "median_attention_rank": (float(np.median(cat["attention_rank"][unforced]))
                                  if unforced.any() else None),
        "attention_mass": float(cat["attention_mass"].mean()),
    })
  return rows


def free_slots(cfg: InfLLMv2Config) -> int:
  """Top-k slots left after the forced blocks, for a query past the first init + local blocks."""
  return cfg.topk - cfg.init_blocks - cfg.local_blocks


def run_probe(model, tokenizer, cfg: InfLLMv2Config, *, tasks, lengths, depths, samples: int,
              seed: int = 0, haystack: str = "noise", corpus: str = "stdlib",
              answer_tokens: int | None = None) -> dict:
  """The probe over every (task, length, depth, sample) prompt of the harness's generators:
  {"prompts": count, "free_slots": ..., "layers": `summarize` rows}."""
  from sparsejax.eval.tasks import make_sample

  results = []
  for task in tasks:
    for length in lengths:
      for depth in depths:
        for i in range(samples):
          sample = make_sample(task, tokenizer, int(length), depth=float(depth), seed=seed + i,
                               haystack=haystack, corpus=corpus)
          prompt = needle_prompt(tokenizer, sample.prompt, sample.answers, answer_tokens)
          results.append(probe_model(model, prompt, cfg))
  return {"prompts": len(results), "free_slots": free_slots(cfg),
          "layers": summarize(results, free_slots(cfg))}


def table_lines(layers: list[dict]) -> list[str]:
  """A markdown table of `summarize` rows, with its legend."""
  def f(x, pct=True):
    return "-" if x is None else (f"{100 * x:.1f}" if pct else f"{x:g}")
  lines = ["`selected`: % of cases (prompt x query x KV head) whose needle block is selected "
           "(forced included); `forced`: % inside the init or local blocks; over the unforced "
           "cases: `sel.` % selected, `oracle` % an exact-attention ranking would select, the "
           "median ranks of the needle block by block score and by attention mass; `mass`: mean "
           "attention mass on the needle block (all cases).", "",
           "| layer | cases | selected | forced | sel. | oracle | rank (score) | rank (attention) "
           "| mass |", "|---|---|---|---|---|---|---|---|---|"]
  for r in layers:
    lines.append(f"| {r['layer']} | {r['cases']} | {f(r['selected'])} | {f(r['forced'])} | "
                 f"{f(r['selected_unforced'])} | {f(r['oracle_selected_unforced'])} | "
                 f"{f(r['median_selection_rank'], False)} | "
                 f"{f(r['median_attention_rank'], False)} | {r['attention_mass']:.3f} |")
  return lines
