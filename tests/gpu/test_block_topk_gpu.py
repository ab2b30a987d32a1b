"""The sort-free top-k kernel on the GPU (Triton lowering) against XLA's top_k and sort, bit for
bit, at InfLLM-V2's widths; and inside score_and_select."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_scores import score_and_select
from pallas_kernels.block_topk import top_blocks
from sparsejax.ops import infllmv2 as ref_ops


@pytest.mark.parametrize("rows,n_blocks,topk,levels,local", [
    (4096, 2048, 64, 0, 0), (4096, 2048, 64, 0, 32), (4096, 2048, 96, 0, 32), (2048, 512, 64, 4, 0),
    (1000, 333, 16, 0, 4), (512, 40, 64, 0, 0)])
def test_matches_xla_top_k(rows, n_blocks, topk, levels, local):
  key = jax.random.uniform(jax.random.key(rows + n_blocks), (rows, n_blocks), jnp.float32)
  if levels:  # few distinct values: ties everywhere
    key = jnp.floor(key * levels)
  # Forced (+inf: block 0 and `local` blocks up to the row's last) and ineligible (-inf)
  # columns as selection_keys makes them.
  col = jnp.arange(n_blocks)[None, :]
  cut = jax.random.randint(jax.random.key(7), (rows, 1), 0, n_blocks + 1)
  forced = (col == 0) | ((col <= cut) & (col > cut - local))
  key = jnp.where(col > cut, -jnp.inf, jnp.where(forced, jnp.inf, key))
  want = jax.jit(lambda k: ref_ops.top_blocks(k, topk))(key)
  got = jax.jit(lambda k: top_blocks(k, topk, implementation="pallas"))(key)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("packed", [True, False])
def test_score_and_select_with_the_kernel(packed):
  """Packed rows select from XLA's keys; one-document rows from the scoring kernel's own and
  tail maxima, which the top-k kernel merges as it loads them (merge_tail in jnp for XLA's)."""
  seq, heads, kv_heads = 8192, 32, 2
  keys = jax.random.split(jax.random.key(3), 2)
  q = jax.random.normal(keys[0], (1, seq, heads, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, kv_heads, 128), jnp.bfloat16)
  seg = None
  if packed:
    seg = jnp.asarray(np.r_[np.ones(seq // 3), 2 * np.ones(seq - seq // 3)][None], jnp.int32)
  cfg = ref_ops.InfLLMv2Config(init_blocks=1, local_blocks=8, topk=24, dense_len=0)
  select = lambda impl: jax.jit(lambda q, k: score_and_select(
      q, k, cfg, segment_ids=seg, topk_implementation=impl))(q, k)
  for g, w in zip(select("pallas"), select("reference")):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
