"""The union-of-experts FFN kernels on the GPU (Triton lowering) against the jnp reference, bf16,
at the benchmark's layer (d_model 2048, 128 experts of width 128) and BlockFFN's 0.1B layer
(d_model 768, 48 experts of width 64: a non-power-of-two expert count), with every kernel mode of
both paths (two kernels; the fused one, whose atomic adds only a GPU runs for real), the benchmark
sweep's extreme tiles and poisoned output buffers (two kernels); weights in the expert-major
layouts (ExpertWeights / FusedExpertWeights.from_layer on the device)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.union_ffn import (ExpertWeights, FusedExpertWeights, UnionFFNConfig,
                                      union_ffn, union_ffn_reference)

SPARSITIES = (0.0, 0.5, 0.875, 0.95, 1.0)
CONFIGS = {
    "default": UnionFFNConfig(),
    "dot_rows": UnionFFNConfig(small_n="dot"),
    "broadcast_rows": UnionFFNConfig(small_n="broadcast"),
    "xla_index": UnionFFNConfig(index="xla"),
    "w32_d32": UnionFFNConfig(block_w=32, block_k=512, block_d=32, num_stages=4),
    "wide_k_unroll8": UnionFFNConfig(block_k=2048, num_warps=8, num_stages=2, down_unroll=8,
                                     down_num_stages=2),
    "one_per_iter": UnionFFNConfig(down_unroll=1, down_num_stages=4, small_n="dot"),
    "few_warps": UnionFFNConfig(num_warps=2, down_num_warps=2),
}
# The fused path: its default, the public plgpu.atomic_add (acquire-release), both row modes, the
# in-XLA index with 32-unit chunks, and the benchmark sweep's extreme tiles (64-unit chunks with
# whole-d_model steps; 256-column steps).
FUSED_CONFIGS = {
    "fused": UnionFFNConfig(fusion="fused"),
    "fused_acq_rel": UnionFFNConfig(fusion="fused", atomics="acq_rel"),
    "fused_dot_rows": UnionFFNConfig(fusion="fused", small_n="dot"),
    "fused_broadcast_rows": UnionFFNConfig(fusion="fused", small_n="broadcast"),
    "fused_xla_index_w32": UnionFFNConfig(fusion="fused", index="xla", block_w=32, block_n=512,
                                          num_warps=8),
    "fused_w64_n2048": UnionFFNConfig(fusion="fused", block_w=64, block_k=2048, block_n=2048,
                                      num_warps=8, num_stages=2),
    "fused_n256": UnionFFNConfig(fusion="fused", block_k=512, block_n=256, num_stages=4),
}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def layer(seed, n, d_model, num_experts, width, fusion):
  """x [n, d] and the layer's experts, made in the layer layout and transposed on the device
  into the layout `fusion` reads."""
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (n, d_model), jnp.float32).astype(jnp.bfloat16)
  w_up = (jax.random.normal(keys[1], (d_model, num_experts, width), jnp.float32)
          / np.sqrt(d_model)).astype(jnp.bfloat16)
  w_down = (jax.random.normal(keys[2], (num_experts, width, d_model), jnp.float32)
            / np.sqrt(width)).astype(jnp.bfloat16)
  weights_type = FusedExpertWeights if fusion == "fused" else ExpertWeights
  return x, jax.jit(weights_type.from_layer)(w_up, w_down)


def router_weights(rng, n, num_experts, sparsity):
  """A union of exactly round(E * (1 - sparsity)) experts; the last token of n >= 3 has none."""
  union_size = int(round(num_experts * (1 - sparsity)))
  union = rng.choice(num_experts, size=union_size, replace=False)
  live = n - 1 if n >= 3 else n
  active = np.zeros((n, num_experts), bool)
  active[:live, union] = rng.random((live, union_size)) < 0.4
  active[rng.integers(0, live, size=union_size), union] = True
  return jnp.asarray(np.where(active, rng.uniform(0.1, 1.0, (n, num_experts)), 0.0),
                     jnp.float32)


def check(n, d_model, num_experts, width, config, sparsities=SPARSITIES):
  x, experts = layer(n, n, d_model, num_experts, width, config.fusion)
  rng = np.random.default_rng(n + d_model)
  # (the fused path's output starts at zeros by design: nothing to poison)
  kernel = jax.jit(lambda *a: union_ffn(*a, config=config,
                                        poison_outputs=config.fusion == "two_kernels"))
  reference = jax.jit(lambda x, *a: union_ffn_reference(x.astype(jnp.float32), *a))
  for sparsity in sparsities:
    weights = router_weights(rng, n, num_experts, sparsity)
    got = kernel(x, weights, experts)
    want = reference(x, weights, experts)
    assert got.dtype == jnp.bfloat16 and got.shape == (n, d_model)
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all(), f"NaN (unwritten tile / unwritten h read) at {sparsity}"
    if sparsity == 1.0:
      assert (got == 0).all()
      continue
    if n >= 3:
      assert (got[-1] == 0).all()
    assert rel_err(got, want) < 1e-2, (sparsity, rel_err(got, want))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 5, 8, 32])
def test_pallas_matches_reference(n, name):
  check(n, 2048, 128, 128, CONFIGS[name])


@pytest.mark.parametrize("name", list(FUSED_CONFIGS))
@pytest.mark.parametrize("n", [1, 5, 8, 32])
def test_fused_matches_reference(n, name):
  check(n, 2048, 128, 128, FUSED_CONFIGS[name])


@pytest.mark.parametrize("n", [1, 8, 64, 128])
def test_blockffn_small_layer_and_long_rows(n):
  """d 768, 48 experts (padded to 64 for the in-kernel index) of width 64; up to 128 rows."""
  check(n, 768, 48, 64, UnionFFNConfig(), sparsities=(0.5, 0.875, 1.0))
  check(n, 768, 48, 64, UnionFFNConfig(index="xla", block_d=32, down_unroll=3),
        sparsities=(0.7,))
  check(n, 768, 48, 64, UnionFFNConfig(fusion="fused"), sparsities=(0.5, 0.875, 1.0))
