"""NOSA's offloaded decode (sparsejax.inference.offload): the diff keeps hits in place and loads
only misses, and attention over the device buffer equals sparse decode over the whole cache."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_decode import sparse_decode
from sparsejax.inference.offload import (fill_own_block, offload, offloaded_attend,
                                         plan_transfers, write_token)


def test_plan_keeps_hits_in_place_and_fills_free_slots_in_order():
  slot_block = jnp.array([[[3, 7, -1, 9]]], jnp.int32)      # R = 4 regular slots
  want = jnp.array([[[0, 2, 7, 9, 12]]], jnp.int32)          # own block 12 goes to the last slot
  new, load, live = plan_transfers(slot_block, want, jnp.array([12]))
  assert new.tolist() == [[[0, 7, 2, 9]]]                    # 7, 9 stay; 0, 2 fill slots 0, 2
  assert load.tolist() == [[[True, False, True, False]]]
  assert live.tolist() == [[[True, True, True, True]]]
  # Fewer wanted blocks than slots: a slot left over keeps its stale block but is not live.
  new, load, live = plan_transfers(new, jnp.array([[[2, 12, -1, -1, -1]]]), jnp.array([12]))
  assert new.tolist() == [[[0, 7, 2, 9]]] and not load.any()
  assert live.tolist() == [[[False, False, True, False]]]


def _selection(rng, pos, kvh, k, block):
  """Random distinct blocks up to the own one, the own one included, ascending, -1 padded."""
  own = pos // block
  out = np.full((len(pos), kvh, k), -1, np.int32)
  for r, p in enumerate(own):
    for h in range(kvh):
      others = rng.choice(p, size=min(p, k - 1 - rng.integers(0, 2)), replace=False)
      chosen = np.sort(np.r_[others, p])
      out[r, h, :len(chosen)] = chosen
  return out


@pytest.mark.parametrize("implementation", ["reference", "interpret"])
def test_offloaded_steps_equal_decode_over_the_whole_cache(implementation):
  rng = np.random.default_rng(0)
  b, cap, kvh, g, d, block, k_sel = 2, 320, 2, 2, 16, 16, 6
  keys = jax.random.split(jax.random.key(0), 4)
  k = jax.random.normal(keys[0], (b, cap, kvh, d))
  v = jax.random.normal(keys[1], (b, cap, kvh, d))
  evict = 2.0 * jax.random.normal(keys[2], (b, cap, kvh))
  qs = jax.random.normal(keys[3], (12, b, kvh * g, d))
  pos = np.array([250, 200])
  state = fill_own_block(offload(k, v, slots=k_sel, block_size=block), evict, jnp.asarray(pos))
  previous = None
  for step in range(12):
    p = jnp.asarray(pos + step)
    rows = jnp.arange(b)
    state = write_token(state, k[rows, p], v[rows, p], evict[rows, p], p)
    idx = jnp.asarray(_selection(rng, pos + step, kvh, k_sel, block))
    out, state, stats = offloaded_attend(qs[step], state, idx, evict, p,
                                         implementation=implementation)
    want, _ = sparse_decode(qs[step], k, v, idx, None, p + 1, block_size=block,
                            key_bias=evict, implementation="reference")
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    # Hits are the regular blocks the step before also held; loads the rest.
    own = (pos + step) // block
    regular = [[set(idx[r, h].tolist()) - {-1, int(own[r])} for h in range(kvh)]
               for r in range(b)]
    if previous is not None:
      for r in range(b):
        for h in range(kvh):
          assert int(stats["hits"][r, h]) == len(regular[r][h] & previous[r][h])
          assert int(stats["loads"][r, h]) == len(regular[r][h] - previous[r][h])
    previous = [[set(state.slot_block[r, h].tolist()) - {-1} for h in range(kvh)]
                for r in range(b)]
  assert state.host_k.sharding.memory_kind in ("pinned_host", None, "device")


def test_offload_rejects_a_buffer_without_room_for_the_own_block():
  with pytest.raises(ValueError, match="slots must be >= 2"):
    offload(jnp.zeros((1, 64, 1, 16)), jnp.zeros((1, 64, 1, 16)), slots=1, block_size=16)


def test_bench_offload_smoke(tmp_path):
  from tests.test_experiments import run
  stdout = run("experiments.bench_offload", "--capacity=8192", "--batch=1", "--steps=2",
               "--hit_rates=1.0,0.5", "--implementation=reference", f"--out={tmp_path}/b")
  rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
  assert [r["hit_rate"] for r in rows] == [1.0, 0.5]
  assert rows[0]["loads"] == 0 and rows[1]["loads"] > 0       # full hits copy nothing
  assert (tmp_path / "b.md").exists()
