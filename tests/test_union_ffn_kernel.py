"""The union-of-experts FFN kernels (Pallas, interpret mode on the CPU) against the jnp reference:
n = 1, 3, 8, 32 tokens, ragged d_model / expert counts / widths, bf16 and f32, union sparsities
0%, 50%, 90% and 100% (no expert active: zeros), tokens with no expert, every kernel mode
(broadcast and tl.dot rows, union index in the kernel or from XLA, unrolled down loops with
ragged tails, several d_model tiles and width chunks), poisoned buffers; ExpertWeights against
the layer layout; the XLA gather path; bad arguments; the GPU path's lowering to Triton IR
(without a GPU); the benchmark's --quick smoke runs, with and without --sweep.

Each case compiles once and runs its four sparsities on the same compiled kernels (the union is
data), which keeps the file within its CPU budget.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.union_ffn import (ExpertWeights, UnionFFNConfig, union_experts, union_ffn,
                                      union_ffn_gathered, union_ffn_reference, union_index)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSITIES = (0.0, 0.5, 0.9, 1.0)


def router_weights(rng, n, num_experts, sparsity):
  """float32 [n, E] whose union over the n tokens has exactly round(E * (1 - sparsity)) experts:
  each union expert used by a random token (and others at random); the last token of n >= 3 gets
  no expert at all (its row must come out zero)."""
  union_size = int(round(num_experts * (1 - sparsity)))
  union = rng.choice(num_experts, size=union_size, replace=False)
  live = max(1, n - 1) if n >= 3 else n
  active = np.zeros((n, num_experts), bool)
  active[:live, union] = rng.random((live, union_size)) < 0.4
  active[rng.integers(0, live, size=union_size), union] = True
  weights = np.where(active, rng.uniform(0.2, 1.0, (n, num_experts)), 0.0).astype(np.float32)
  assert (weights.any(axis=0).sum()) == union_size
  return jnp.asarray(weights)


def layer(seed, n, d_model, num_experts, width, dtype):
  """x [n, d] and the layer layout w_up [d, E, width], w_down [E, width, d]: random numpy arrays
  (made on the host: no compiles)."""
  rng = np.random.default_rng(seed)
  arrays = (rng.normal(size=(n, d_model)),
            rng.normal(size=(d_model, num_experts, width)) / np.sqrt(d_model),
            rng.normal(size=(num_experts, width, d_model)) / np.sqrt(width))
  return tuple(a.astype(np.float32).astype(jnp.dtype(dtype)) for a in arrays)


def host_experts(w_up, w_down):
  """ExpertWeights.from_layer's layout, transposed by numpy (no compile; the jnp transpose is
  checked against the layer-layout formula in test_expert_weights_reference_and_gathered_path)."""
  return ExpertWeights(np.transpose(w_up, (1, 2, 0)), np.transpose(w_down, (0, 2, 1)))


CASES = [  # n, d_model, experts, width, dtype, config
    # One row: the 2-D broadcast path, union index in the kernel; two d_model tiles per program,
    # two hidden-unit chunks per expert, ragged unroll (4 per iteration).
    (1, 64, 8, 32, jnp.float32, UnionFFNConfig(block_k=32)),
    # Ragged everything: 3 -> 4 rows (3-D broadcast path), 12 -> 16 experts padded for the
    # in-kernel index, d_model 48 (16-element tiles, 16-column down blocks) and width 48 (three
    # 16-unit chunks, three 16-wide down chunks).
    (3, 48, 12, 48, jnp.bfloat16, UnionFFNConfig(small_n="broadcast")),
    # 8 -> 16 rows for tl.dot ("auto"), union list from XLA, one expert per down iteration.
    (8, 64, 16, 16, jnp.bfloat16, UnionFFNConfig(index="xla", down_unroll=1)),
    # 32 rows (tl.dot), 32-unit chunks, 32-element tiles, 32-column down blocks, 3 experts per
    # down iteration (ragged tails).
    (32, 128, 8, 32, jnp.float32, UnionFFNConfig(block_k=32, block_w=32, block_d=32,
                                                 down_unroll=3)),
]


@pytest.mark.parametrize("n,d_model,num_experts,width,dtype,config", CASES)
def test_interpret_matches_reference(n, d_model, num_experts, width, dtype, config):
  x, w_up, w_down = layer(n + d_model + width, n, d_model, num_experts, width, dtype)
  experts = host_experts(w_up, w_down)
  rng = np.random.default_rng(n * 1000 + d_model)
  kernel = jax.jit(lambda *a: union_ffn(*a, implementation="interpret", config=config,
                                        poison_outputs=True))
  reference = jax.jit(union_ffn_reference)
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  for sparsity in SPARSITIES:
    weights = router_weights(rng, n, num_experts, sparsity)
    got = kernel(x, weights, experts)
    want = reference(x, weights, experts)
    assert got.shape == (n, d_model) and got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"unwritten tile or unwritten h read at sparsity {sparsity}"
    if sparsity == 1.0:
      assert (got == 0).all()
    if n >= 3:
      assert (got[-1] == 0).all()                 # the token with no expert
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()),
                               err_msg=f"sparsity {sparsity}")


def test_expert_weights_reference_and_gathered_path():
  weights = jnp.array([[0.0, 0.5, 0.0, 0.0, 0.2],
                       [0.0, 0.0, 0.0, 0.7, 0.0],
                       [0.0, 0.1, 0.0, 0.0, 0.0]])
  x, w_up, w_down = layer(0, 3, 32, 5, 16, jnp.float32)

  @jax.jit
  def everything(x, weights, w_up, w_down):
    experts = ExpertWeights.from_layer(w_up, w_down)
    return (experts, union_experts(weights, 5), union_index(weights, 8),
            union_ffn_reference(x, weights, experts),
            union_ffn(x, weights, experts, implementation="reference"),
            [union_ffn_gathered(x, weights, experts, max_union=u) for u in (3, 5)])

  experts, (union, count), index, want, ref_op, gathered = everything(x, weights, w_up, w_down)
  assert isinstance(experts, ExpertWeights)
  np.testing.assert_array_equal(experts.up_t, host_experts(w_up, w_down).up_t)
  np.testing.assert_array_equal(experts.down_t, host_experts(w_up, w_down).down_t)
  assert int(count) == 3
  np.testing.assert_array_equal(union, [1, 3, 4, 0, 0])
  np.testing.assert_array_equal(index, [3, 1, 3, 4, 0, 0, 0, 0])
  np.testing.assert_array_equal(ref_op, want)
  # Against a float64 numpy evaluation of the formula on the layer layout.
  xn, wun, wdn, an = (np.asarray(v, np.float64) for v in (x, w_up, w_down, weights))
  pre = np.einsum("nd,dew->new", xn, wun)
  h = pre / (1 + np.exp(-pre)) * an[..., None]
  np.testing.assert_allclose(want, np.einsum("new,ewd->nd", h, wdn), rtol=1e-5, atol=1e-5)
  for got in gathered:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
  # numpy inputs: validation reads shapes and dtypes only, so nothing compiles here.
  x, w_up, w_down = layer(0, 4, 32, 8, 16, jnp.float32)
  up_t, down_t = host_experts(w_up, w_down)              # [8, 16, 32], [8, 32, 16]
  weights = np.ones((4, 8), np.float32)
  cases = [
      (dict(implementation="cuda"), "implementation must be one of"),
      (dict(experts=(up_t, down_t)), "experts must be an ExpertWeights"),
      (dict(experts=ExpertWeights(w_up, w_down)),
       "experts.up_t must be \\[num_experts, expert_width, d_model=32\\]"),
      (dict(x=x[None]), "x must be \\[n_tokens, d_model\\]"),
      (dict(x=x[:, :16]), "experts.up_t must be \\[num_experts, expert_width, d_model=16"),
      (dict(experts=ExpertWeights(up_t, down_t[:, :, :8])),
       "experts.down_t must be \\[num_experts, d_model, expert_width\\] = \\(8, 32, 16\\)"),
      (dict(weights=weights[:, :7]), "weights must be \\[n_tokens, num_experts\\]"),
      (dict(weights=weights.astype(np.int32)), "weights must be a floating-point array"),
      (dict(experts=ExpertWeights(up_t, down_t.astype(np.int8))),
       "experts.down_t must be a floating-point array"),
      (dict(experts=ExpertWeights(up_t, down_t.astype(jnp.bfloat16))),
       "experts.up_t and experts.down_t must share a dtype"),
      (dict(x=np.zeros((129, 32), np.float32), weights=np.ones((129, 8), np.float32)),
       "n_tokens=129"),
      (dict(x=x[:, :24], experts=ExpertWeights(up_t[..., :24], down_t[:, :24])),
       "d_model must be a multiple"),
      (dict(experts=ExpertWeights(up_t[:, :8], down_t[..., :8])),
       "expert_width must be a multiple of 16"),
      (dict(config="fast"), "config must be a UnionFFNConfig"),
  ]
  for override, message in cases:
    args = dict(x=x, weights=weights, experts=ExpertWeights(up_t, down_t),
                implementation="interpret")
    args.update(override)
    with pytest.raises(ValueError, match=message):
      union_ffn(args.pop("x"), args.pop("weights"), args.pop("experts"), **args)
  with pytest.raises(ValueError, match="from_layer: w_up must be \\[d_model, num_experts, "):
    ExpertWeights.from_layer(w_up[0], w_down)
  with pytest.raises(ValueError, match="from_layer: w_down must be .* = \\(8, 16, 32\\)"):
    ExpertWeights.from_layer(w_up, down_t)                 # expert-major instead of the layer's
  for field, value in (("block_k", 24), ("block_w", 8), ("block_d", 0), ("small_n", "tiny"),
                       ("index", "host"), ("num_warps", 3), ("down_num_warps", 32),
                       ("num_stages", 0), ("down_num_stages", 0), ("down_unroll", 0)):
    with pytest.raises(ValueError, match=f"UnionFFNConfig: {field} must be"):
      UnionFFNConfig(**{field: value})


@pytest.mark.parametrize("n,config", [
    (1, UnionFFNConfig()),
    (5, UnionFFNConfig(small_n="broadcast", block_k=2048, num_warps=8)),
    (8, UnionFFNConfig(small_n="dot", index="xla")),
    (32, UnionFFNConfig(block_d=32, block_w=32, down_unroll=8, down_num_warps=8)),
    (128, UnionFFNConfig(block_k=2048, num_stages=4)),
])
def test_kernels_lower_to_triton_for_cuda(monkeypatch, n, config):
  """The GPU path's Pallas -> Triton IR lowering at the benchmark's shape, on the CPU: catches a
  primitive or shape the Triton lowering rejects (not Triton's own compile to PTX, which only the
  GPU tests exercise). jax.export lowers for "cuda" without a GPU; the Triton lowering asks for
  the device's compute capability, which a fake H100 answers (a private hook of jax 0.11)."""
  from jax import export
  from jax._src.pallas.triton import gpu_info
  h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: h100)
  args = (jax.ShapeDtypeStruct((n, 2048), jnp.bfloat16),
          jax.ShapeDtypeStruct((n, 128), jnp.float32),
          ExpertWeights(jax.ShapeDtypeStruct((128, 128, 2048), jnp.bfloat16),
                        jax.ShapeDtypeStruct((128, 2048, 128), jnp.bfloat16)))
  fn = jax.jit(lambda *a: union_ffn(*a, config=config, poison_outputs=True))
  exported = export.export(
      fn, platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2   # two kernels, one launch each


# The sweep's smoke run fixes the up kernel's fields (flags given fix them), so it times the base,
# three down-kernel options and two whole-op options (plus their combination, if new): the family
# and combination logic in a few seconds.
SWEEP_SMOKE = ["--sweep", "--block_w=16", "--block_k=1024", "--num_warps=4", "--num_stages=3",
               "--block_d=16", "--down_num_warps=4"]


@pytest.mark.parametrize("extra", [[], SWEEP_SMOKE], ids=["plain", "sweep"])
def test_bench_quick(tmp_path, extra):
  out = str(tmp_path / "bench_ffn")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_ffn", "--quick", f"--out={out}", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      # A smoke run: skip XLA's backend optimisations (compiles about twice as fast on a CPU).
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0"))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  with open(out + ".json") as f:
    result = json.load(f)
  assert result["device"] and result["jax"] == jax.__version__
  assert len(result["rows"]) == 1
  row = result["rows"][0]
  for key in ("n_tokens", "union_sparsity", "sparsejax_ms", "dense_ms", "speedup_vs_dense",
              "xla_gather_ms", "bound_ms", "ratio_to_bound", "bytes_floor_ms", "achieved_gbps",
              "config"):
    assert key in row, key
  assert row["union_sparsity"] == 0.875 and row["rel_err"] < 2e-2
  timed = [entry["config"] for entry in result["sweep"]]
  assert all("sparsejax_ms" in entry for entry in result["sweep"])   # none failed
  assert row["config"] in timed
  if extra:
    assert len(timed) >= 6 and len({json.dumps(c, sort_keys=True) for c in timed}) == len(timed)
    assert {c["index"] for c in timed} == {"kernel", "xla"}
    assert {c["small_n"] for c in timed} == {"broadcast", "dot"}
    assert {c["down_unroll"] for c in timed} >= {1, 2, 4, 8}
    assert {c["block_k"] for c in timed} == {1024}                  # a given flag fixes its field
  else:
    assert len(timed) == 1
  with open(out + ".md") as f:
    assert "| n | union sparsity | sparsejax us |" in f.read()
