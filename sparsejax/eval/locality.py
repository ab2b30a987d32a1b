"""How much adjacent decoding steps' block selections overlap: NOSA's locality, for one model.

An offloaded KV cache (NOSA's system) keeps only the blocks the last step selected on the GPU;
each step copies the blocks it selects that the last one did not. So the fraction of a step's
selected blocks that the previous step also selected (the cache hit rate) decides how much
crosses PCIe, and NOSA's split selection exists to raise it (the paper: 94.4% against
InfLLM-V2's 88.9%).

`selection_locality` measures it on a prompt with teacher forcing: the selections of the last
`steps` positions of one forward pass are those a decode over the same tokens would make (the
query of step t is the model's query at position t, and the cache holds the tokens before it).
Per layer, over the steps and KV heads:
  hit_rate         mean over steps of |S_t & S_{t-1}| / |S_t|
  new_blocks       mean |S_t - S_{t-1}|: the blocks a step would copy host-to-device
  selected         mean |S_t|
A model with attention="infllmv2" selects with InfLLM-V2's rule, one with "nosa" with NOSA's
(its own eviction head); both from the model's own q, k (and v).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sparsejax.eval.selection import rotated_qkv
from sparsejax.layers.infllmv2 import block_sparse_config
from sparsejax.ops.infllmv2 import block_scores, select_blocks
from sparsejax.ops.nosa import eviction_scores, nosa_select_blocks


def overlap(idx: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
  """Consecutive selections' overlap: idx / valid [steps, kv_heads, slots] (one row per step, in
  order) -> arrays [steps - 1, kv_heads]: hits (|S_t & S_{t-1}|), new (|S_t - S_{t-1}|) and size
  (|S_t|), for t = 1 .. steps - 1."""
  idx, valid = np.asarray(idx), np.asarray(valid)
  current = np.where(valid, idx, -1)[1:]
  previous = np.where(valid, idx, -2)[:-1]
  kept = (current[..., :, None] == previous[..., None, :]).any(-1) & valid[1:]
  hits = kept.sum(-1)
  size = valid[1:].sum(-1)
  return {"hits": hits, "new": size - hits, "size": size}


def selection_locality(model, tokens: np.ndarray, steps: int) -> list[dict]:
  """Per layer {"layer", "steps", "hit_rate", "new_blocks", "selected"} for the last `steps`
  positions of `tokens` (int [t], one sequence), teacher-forced (module docstring)."""
  tokens = np.asarray(tokens)
  t = len(tokens)
  if not 2 <= steps <= t:
    raise ValueError(f"selection_locality: steps must be in [2, len(tokens)={t}], got {steps}")
  cfg = block_sparse_config(model.config)
  start = jnp.asarray([t - steps], jnp.int32)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  rows = []
  layers = rotated_qkv(model, jnp.asarray(tokens, jnp.int32)[None], positions)
  for i, (q, k, v) in enumerate(layers):
    q_tail = q[:, t - steps:]
    if model.config.attention == "nosa":
      attn = model.blocks[i].attn
      evict = eviction_scores(v, attn.evict_scale[...], attn.evict_proj[...])
      idx, valid = nosa_select_blocks(q_tail, k, evict, cfg, q_start=start)
    else:
      scores = block_scores(q_tail, k, cfg, q_start=start)
      idx, valid = select_blocks(scores, cfg, q_len=steps, kv_len=t, q_start=start)
    o = overlap(idx[0], valid[0])
    rows.append({"layer": i, "steps": steps,
                 "hit_rate": float(np.mean(o["hits"] / np.maximum(o["size"], 1))),
                 "new_blocks": float(np.mean(o["new"])),
                 "selected": float(np.mean(o["size"]))})
  return rows
