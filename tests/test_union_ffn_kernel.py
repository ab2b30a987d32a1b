"""The union-of-experts FFN kernels (Pallas, interpret mode on the CPU) against the jnp reference:
n = 1, 3, 8, 17, 32 tokens, ragged d_model / expert counts / widths, bf16 and f32, union
sparsities 0%, 50%, 90% and 100% (no expert active: zeros), tokens with no expert, both paths
(two kernels, and the fused one with its atomic adds) in every kernel mode (broadcast and tl.dot
rows, union index in the kernel or from XLA, unrolled down loops with ragged tails, several
d_model tiles, width chunks and output column blocks), poisoned buffers (two kernels);
ExpertWeights and FusedExpertWeights against the layer layout; the XLA gather path; bad arguments
and mismatched layouts; the GPU path's lowering to Triton IR (without a GPU); the benchmark's
--quick smoke runs, with and without --sweep.

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

from pallas_kernels.union_ffn import (ExpertWeights, FusedExpertWeights, UnionFFNConfig,
                                      union_experts, union_ffn, union_ffn_gathered,
                                      union_ffn_reference, union_index)

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


def host_experts(w_up, w_down, fusion="two_kernels"):
  """ExpertWeights.from_layer's layout (FusedExpertWeights' for fusion="fused"), transposed by
  numpy (no compile; the jnp transposes are checked against the layer-layout formula in
  test_expert_weights_reference_and_gathered_path)."""
  up_t = np.transpose(w_up, (1, 2, 0))
  if fusion == "fused":
    return FusedExpertWeights(up_t, w_down)
  return ExpertWeights(up_t, np.transpose(w_down, (0, 2, 1)))


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
    # The fused path. One row (2-D broadcast, a [16, 1] column against [16, 32] down tiles): two
    # d_model tiles, two column blocks, two hidden chunks per expert.
    (1, 64, 8, 32, jnp.float32, UnionFFNConfig(fusion="fused", block_k=32, block_n=32)),
    # 3 -> 4 rows broadcast, 12 experts (padded to 16 for the in-kernel index), d_model 48 (three
    # 16-column blocks), width 48 (three 16-unit chunks).
    (3, 48, 12, 48, jnp.bfloat16, UnionFFNConfig(fusion="fused", small_n="broadcast")),
    # 8 -> 16 rows for tl.dot, 6 experts, union list from XLA, one whole-d_model column block.
    (8, 64, 6, 16, jnp.bfloat16, UnionFFNConfig(fusion="fused", small_n="dot", index="xla")),
    # 17 -> 32 rows (tl.dot), 10 experts padded to 16, 32-unit chunks, two column blocks; the
    # public plgpu.atomic_add (acquire-release) instead of the relaxed primitive.
    (17, 64, 10, 32, jnp.float32, UnionFFNConfig(fusion="fused", block_w=32, block_n=32,
                                                 atomics="acq_rel")),
    # 32 rows, bf16, 16-unit chunks of a 64-wide expert, four column blocks, 64-element tiles.
    (32, 128, 8, 64, jnp.bfloat16, UnionFFNConfig(fusion="fused", block_k=64, block_n=32,
                                                  index="xla")),
]


def case_id(case):
  n, d_model, num_experts, width, dtype, config = case
  return f"{config.fusion}-n{n}-d{d_model}-e{num_experts}-w{width}-{jnp.dtype(dtype).name}"


@pytest.mark.parametrize("n,d_model,num_experts,width,dtype,config", CASES,
                         ids=[case_id(c) for c in CASES])
def test_interpret_matches_reference(n, d_model, num_experts, width, dtype, config):
  x, w_up, w_down = layer(n + d_model + width, n, d_model, num_experts, width, dtype)
  experts = host_experts(w_up, w_down, config.fusion)
  rng = np.random.default_rng(n * 1000 + d_model)
  # The fused path has nothing to poison: its output starts at zeros by design.
  kernel = jax.jit(lambda *a: union_ffn(*a, implementation="interpret", config=config,
                                        poison_outputs=config.fusion == "two_kernels"))
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
    fused = FusedExpertWeights.from_layer(w_up, w_down)
    return (experts, fused, union_experts(weights, 5), union_index(weights, 8),
            union_ffn_reference(x, weights, experts),
            [union_ffn(x, weights, e, implementation="reference") for e in (experts, fused)],
            [union_ffn_gathered(x, weights, e, max_union=u) for u in (3, 5)
             for e in (experts, fused)])

  experts, fused, (union, count), index, want, ref_ops, gathered = everything(
      x, weights, w_up, w_down)
  assert isinstance(experts, ExpertWeights) and isinstance(fused, FusedExpertWeights)
  np.testing.assert_array_equal(experts.up_t, host_experts(w_up, w_down).up_t)
  np.testing.assert_array_equal(experts.down_t, host_experts(w_up, w_down).down_t)
  np.testing.assert_array_equal(fused.up_t, experts.up_t)
  np.testing.assert_array_equal(fused.down, w_down)
  assert int(count) == 3
  np.testing.assert_array_equal(union, [1, 3, 4, 0, 0])
  np.testing.assert_array_equal(index, [3, 1, 3, 4, 0, 0, 0, 0])
  np.testing.assert_array_equal(ref_ops[0], want)
  np.testing.assert_allclose(ref_ops[1], want, rtol=1e-6, atol=1e-6)   # the other layout
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
  fused = FusedExpertWeights(up_t, w_down)               # [8, 16, 32], [8, 16, 32]
  weights = np.ones((4, 8), np.float32)
  fused_config = UnionFFNConfig(fusion="fused")
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
      # Layouts that don't match the config, or each other.
      (dict(experts=fused), "config.fusion='two_kernels' needs experts of type ExpertWeights "
       "\\(ExpertWeights.from_layer\\(w_up, w_down\\)\\), got FusedExpertWeights"),
      (dict(config=fused_config),
       "config.fusion='fused' needs experts of type FusedExpertWeights .* got ExpertWeights"),
      (dict(experts=FusedExpertWeights(up_t, down_t), config=fused_config),
       "experts.down must be \\[num_experts, expert_width, d_model\\] = \\(8, 16, 32\\)"),
      (dict(experts=ExpertWeights(up_t, w_down)),
       "experts.down_t must be \\[num_experts, d_model, expert_width\\] = \\(8, 32, 16\\)"),
      (dict(experts=FusedExpertWeights(up_t, w_down.astype(jnp.bfloat16)), config=fused_config),
       "experts.up_t and experts.down must share a dtype"),
      (dict(experts=fused, config=fused_config, poison_outputs=True),
       "poison_outputs=True does not apply to config.fusion='fused'"),
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
  with pytest.raises(ValueError, match="FusedExpertWeights.from_layer: w_down must be .* = "
                     "\\(8, 16, 32\\)"):
    FusedExpertWeights.from_layer(w_up, down_t)
  for field, value in (("block_k", 24), ("block_w", 8), ("block_d", 0), ("small_n", "tiny"),
                       ("index", "host"), ("num_warps", 3), ("down_num_warps", 32),
                       ("num_stages", 0), ("down_num_stages", 0), ("down_unroll", 0),
                       ("block_n", 48), ("fusion", "one_kernel"), ("atomics", "seq_cst")):
    with pytest.raises(ValueError, match=f"UnionFFNConfig: {field} must be"):
      UnionFFNConfig(**{field: value})


@pytest.mark.parametrize("n,config", [
    (1, UnionFFNConfig()),
    (5, UnionFFNConfig(small_n="broadcast", block_k=2048, num_warps=8)),
    (8, UnionFFNConfig(small_n="dot", index="xla")),
    (32, UnionFFNConfig(block_d=32, block_w=32, down_unroll=8, down_num_warps=8)),
    (128, UnionFFNConfig(block_k=2048, num_stages=4)),
    (1, UnionFFNConfig(fusion="fused")),
    (5, UnionFFNConfig(fusion="fused", small_n="broadcast", block_n=256)),
    (8, UnionFFNConfig(fusion="fused", small_n="dot", index="xla")),
    (32, UnionFFNConfig(fusion="fused", block_w=32, block_n=512, num_warps=8,
                        atomics="acq_rel")),
    (128, UnionFFNConfig(fusion="fused", block_w=64, num_stages=4)),
])
def test_kernels_lower_to_triton_for_cuda(monkeypatch, n, config):
  """The GPU path's Pallas -> Triton IR lowering at the benchmark's shape, on the CPU: catches a
  primitive or shape the Triton lowering rejects (not Triton's own compile to PTX, which only the
  GPU tests exercise). jax.export lowers for "cuda" without a GPU; the Triton lowering asks for
  the device's compute capability, which a fake H100 answers (a private hook of jax 0.11). The
  fused kernel's Triton IR must carry its atomics' memory order (the relaxed one is our own
  primitive's lowering)."""
  from jax import export
  from jax._src.pallas.triton import gpu_info, pallas_call_registration
  h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: h100)
  triton_ir = []
  lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

  def spy(*args, **kwargs):
    result = lower(*args, **kwargs)
    triton_ir.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  monkeypatch.setattr(pallas_call_registration.lowering, "lower_jaxpr_to_triton_module", spy)
  fused = config.fusion == "fused"
  up_t = jax.ShapeDtypeStruct((128, 128, 2048), jnp.bfloat16)
  experts = (FusedExpertWeights(up_t, up_t) if fused else
             ExpertWeights(up_t, jax.ShapeDtypeStruct((128, 2048, 128), jnp.bfloat16)))
  args = (jax.ShapeDtypeStruct((n, 2048), jnp.bfloat16),
          jax.ShapeDtypeStruct((n, 128), jnp.float32), experts)
  fn = jax.jit(lambda *a: union_ffn(*a, config=config, poison_outputs=not fused))
  exported = export.export(
      fn, platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  module = exported.mlir_module()
  assert module.count("__gpu$xla.gpu.triton") == (1 if fused else 2)   # one launch per kernel
  atomics = [ir.count("tt.atomic_rmw") for ir in triton_ir]
  if fused:
    assert atomics == [1] and f"tt.atomic_rmw fadd, {config.atomics}, gpu" in triton_ir[0]
  else:
    assert atomics == [0, 0]


# The sweep's smoke run fixes the up kernel's fields (flags given fix them), so it times the base,
# the fused options' four block_n values (and tl.dot rows), three down-kernel options and two
# whole-op options (plus the combinations, if new): the family and combination logic in seconds.
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
  assert {c["fusion"] for c in timed} == {"two_kernels", "fused"}   # both paths, even plain
  if extra:
    assert len(timed) >= 10 and len({json.dumps(c, sort_keys=True) for c in timed}) == len(timed)
    assert {c["index"] for c in timed} == {"kernel", "xla"}
    assert {c["small_n"] for c in timed} == {"broadcast", "dot"}
    assert {c["down_unroll"] for c in timed} >= {1, 2, 4, 8}
    assert {c["block_n"] for c in timed if c["fusion"] == "fused"} >= {256, 512, 1024, 2048}
    assert {c["block_k"] for c in timed} == {1024}                  # a given flag fixes its field
  else:
    assert len(timed) == 2
  with open(out + ".md") as f:
    assert "| n | union sparsity | sparsejax us |" in f.read()
