"""How many key blocks a tile of 4 query tokens visits (the union of their InfLLM-V2 selections,
what the Mosaic forward attends), with bench_attention's structured inputs: the kernel's
consecutive tokens against tokens regrouped greedily by selection overlap within each 64-token
query block (the regrouping a permuted-query kernel could use), and one token alone.

  python -m experiments.tile_unions --seq_len=16384

The selection is the jnp reference (`score_and_select(implementation="reference")`), so this runs
on the CPU; it materialises [seq, heads, windows] scores, ~2 GB at 16k.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.bench_attention import structured_inputs
from pallas_kernels.block_scores import score_and_select
from sparsejax.ops.infllmv2 import InfLLMv2Config

_SEQ = flags.DEFINE_integer("seq_len", 16384, "Sequence length (a multiple of 64).")
_TILE = flags.DEFINE_integer("tile_tokens", 4, "Query tokens per tile.")


def greedy_groups(sets: list[set], size: int) -> list[set]:
  """Unions of `size` sets each: seed with the first set left, then add the set that grows the
  union least (ties: the earliest), until `size`."""
  left, groups = list(range(len(sets))), []
  while left:
    group = set(sets[left.pop(0)])
    for _ in range(min(size - 1, len(left))):
      best = min(left, key=lambda i: (len(group | sets[i]), i))
      left.remove(best)
      group |= sets[best]
    groups.append(group)
  return groups


def main(argv):
  del argv
  seq, tile = _SEQ.value, _TILE.value
  cfg = InfLLMv2Config(block_size=64, init_blocks=1, local_blocks=32, topk=64, dense_len=0,
                       approximate_lse=True)
  q, k, _ = structured_inputs(seq, jax.random.key(seq))
  idx, valid = jax.jit(lambda q, k: score_and_select(q, k, cfg, implementation="reference"))(q, k)
  idx = np.asarray(jnp.where(valid, idx, -1))[0]                      # [seq, kv_heads, topk]
  sizes = {"consecutive": [], "regrouped": [], "one_token": []}
  for h in range(idx.shape[1]):
    # Query blocks past the local window (before it, every token sees every earlier block).
    for qb in range(cfg.local_blocks, seq // 64):
      sets = [set(int(x) for x in idx[t, h] if x >= 0) for t in range(qb * 64, qb * 64 + 64)]
      sizes["one_token"] += [len(s) for s in sets]
      sizes["consecutive"] += [len(set().union(*sets[i:i + tile])) for i in range(0, 64, tile)]
      sizes["regrouped"] += [len(g) for g in greedy_groups(sets, tile)]
  print(json.dumps({"seq_len": seq, "tile_tokens": tile,
                    **{name: {"mean": float(np.mean(v)), "p90": float(np.percentile(v, 90))}
                       for name, v in sizes.items()}}))


if __name__ == "__main__":
  app.run(main)
