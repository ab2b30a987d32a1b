"""BlockFFN union-of-experts FFN benchmark: sparsejax's union kernel against a dense FFN of the
same parameter count and against XLA gathering the union's weights, at decode-sized n.

  python -m experiments.bench_ffn --out=experiments/results/bench_ffn
  python -m experiments.bench_ffn --sweep --out=/tmp/out/bench_ffn_sweep   # tunables search
  python -m experiments.bench_ffn --quick --out=/tmp/ffn_quick              # CPU smoke (interpret)

Layer: d_model 2048, 128 experts of width 128, bf16 (w_up [2048, 128, 128], w_down
[128, 128, 2048], made in the layer layout and turned into ExpertWeights, and FusedExpertWeights
for the fused path (the same up_t and w_down itself), once per layer, before any timing: serving
transposes static weights once); dense anchor: x @ W1 [2048, 16384] -> SiLU ->
@ W2 [16384, 2048], bf16 with float32 accumulation (the same non-gated form and parameter count).
For each n in --n_tokens and union sparsity s in --sparsities the router weights give each token a
random subset of a random union of round(E * (1 - s)) experts, every union expert used by at least
one token, so the union over the n tokens has exactly that sparsity.

Timing. A decode step reads each layer's weights once, from HBM: the union of one layer is 6-64
MB and the H100's L2 holds 50 MB, so re-running one layer would time L2, not HBM. Each timed call
therefore runs a chain of --layers distinct layers (x_{l+1} = y_l), --passes times over the stack
(so no layer's weights are still in L2 when it comes round again), inside one jit with every
array a jit argument (never closed over: XLA would constant-fold). --reps calls are dispatched
back to back before blocking, so host dispatch overlaps the GPU; the time per layer is the median
over --iters samples of (sample time / reps / (layers * passes)). Launch gaps between the kernels
of consecutive layers are included, as in a real decode step.

host_call_ms is the dispatch cost of a no-op jit with the same arguments; each row's
gpu_to_host_time (kernel time per call / host_call_ms) should stay well above 1.

Reported per row: sparsejax_ms, dense_ms, xla_gather_ms (per layer; XLA gathers from the same
expert-major ExpertWeights), speedup_vs_dense, the bound (dense_ms x active fraction: the target
is sparsejax <= 1.3 x bound), the bytes floor (union weight bytes / --hbm_gbps), achieved GB/s,
and rel_err (relative L2 error) of the kernel against the jnp reference on that row's first
layer; a configuration over 2e-2 is reported as WRONG and never counts as the best.

Configurations. Without --sweep the run times the Cartesian product of the tunable flags (each a
list; defaults: UnionFFNConfig's; --quick adds --fusion=fused to the default two_kernels, so the
smoke run covers both paths). Fields a configuration's path ignores (the down kernel's for the
fused path; block_n and atomics for two kernels) are reset to their defaults, so no kernel is
timed twice. --sweep searches around one base config (the tunable flags, one value each; a flag
given explicitly fixes its field): the base; the fused path's options (FUSED_OPTIONS, the first
of them also with acq_rel atomics and, under 16 tokens, in the other row mode; skipped when
--fusion=two_kernels is given); the up kernel's options (UP_OPTIONS) with the base's down kernel;
the down kernel's options (DOWN_OPTIONS) with the base's up kernel; and whole-op options (index,
and small_n at n = 1). The two kernels are separate launches, so their times add: for each row the
best up, down and whole-op choices are combined and that combination is timed too, and so is the
fastest fused option with the best whole-op choice. Each row reports the fastest configuration
timed; the JSON's "sweep" has every configuration's times. About 20 configurations per n, a few
seconds each (mostly compilation), under --max_minutes (4 with --sweep unless given).
"""
import dataclasses
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import timing
from pallas_kernels.union_ffn import (ExpertWeights, FusedExpertWeights, UnionFFNConfig,
                                      union_ffn, union_ffn_gathered, union_ffn_reference)
from pallas_kernels.union_ffn.kernel import kernel_rows

_N_TOKENS = flags.DEFINE_list("n_tokens", ["1", "8", "32"], "Tokens per call.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.5", "0.7", "0.875", "0.95"],
                                "Union sparsities (fraction of experts inactive for all tokens).")
_D_MODEL = flags.DEFINE_integer("d_model", 2048, "Model width.")
_EXPERTS = flags.DEFINE_integer("experts", 128, "Experts per layer.")
_WIDTH = flags.DEFINE_integer("width", 128, "Expert width (hidden units per expert).")
_LAYERS = flags.DEFINE_integer("layers", 32, "Distinct layers (weight sets) per timed call.")
_PASSES = flags.DEFINE_integer("passes", 2, "Passes over the layer stack per timed call.")
_ITERS = flags.DEFINE_integer("iters", 15, "Timed samples (median); 7 with --sweep unless given.")
_REPS = flags.DEFINE_integer("reps", 4, "Calls dispatched back to back per sample.")
_HBM_GBPS = flags.DEFINE_float("hbm_gbps", 3350.0, "HBM bandwidth for the bytes floor (H100 "
                               "SXM: 3350 GB/s).")
_OUT = flags.DEFINE_string("out", "", "Output path stem (.json and .md).")
_QUICK = flags.DEFINE_bool("quick", False, "CPU smoke run: interpret mode, tiny shapes.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Search the kernel tunables around the base config "
                           "(see the module docstring), report the best per row.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 8.5, "Time budget (4 with --sweep unless "
                                  "given): each n gets an equal share; past it no new kernel "
                                  "configuration starts (its rows keep the best so far).")
# Kernel tunables (UnionFFNConfig fields), each a list: the run times every combination.
_DEFAULT = dataclasses.asdict(UnionFFNConfig())
TUNABLES = {field: flags.DEFINE_list(field, [str(_DEFAULT[field])],
                                     f"UnionFFNConfig.{field} (a list: every value is timed).")
            for field in _DEFAULT}
PARSE = {field: type(value) for field, value in _DEFAULT.items()}

# --sweep's options around the base (see the module docstring; UnionFFNConfig's defaults are the
# base's other point). Up kernel: 16- or 32-unit chunks (64 KB or 128 KB contiguous per program at
# d 2048), tiles of 1-4 KB rows, 4 or 8 warps, 2-4 pipeline stages.
UP_OPTIONS = [dict(block_w=16, block_k=512, num_warps=4, num_stages=4),
              dict(block_w=16, block_k=1024, num_warps=8, num_stages=3),
              dict(block_w=16, block_k=2048, num_warps=8, num_stages=2),
              dict(block_w=32, block_k=512, num_warps=4, num_stages=3),
              dict(block_w=32, block_k=1024, num_warps=8, num_stages=2)]
# Down kernel: 16 or 32 output columns per program (4 or 8 KB per expert), 1-8 experts' loads per
# loop iteration, 2-4 stages.
DOWN_OPTIONS = [dict(block_d=16, down_unroll=1, down_num_warps=4, down_num_stages=4),
                dict(block_d=16, down_unroll=2, down_num_warps=4, down_num_stages=3),
                dict(block_d=16, down_unroll=8, down_num_warps=4, down_num_stages=2),
                dict(block_d=32, down_unroll=4, down_num_warps=4, down_num_stages=3)]
# Fused path: 16-unit chunks (128 programs at a union of 16: one per SM, 262k atomics at n = 1)
# with 256-2048-column steps and 4 or 8 warps, or 32 / 64-unit chunks (half / a quarter of the
# programs and of the atomics, each program streaming 2x / 4x the bytes).
FUSED_OPTIONS = [dict(block_w=16, block_k=1024, block_n=1024, num_warps=4, num_stages=3),
                 dict(block_w=16, block_k=1024, block_n=512, num_warps=8, num_stages=3),
                 dict(block_w=16, block_k=2048, block_n=2048, num_warps=8, num_stages=2),
                 dict(block_w=16, block_k=512, block_n=256, num_warps=4, num_stages=4),
                 dict(block_w=32, block_k=1024, block_n=1024, num_warps=8, num_stages=2),
                 dict(block_w=64, block_k=512, block_n=512, num_warps=8, num_stages=3)]
UP_FIELDS = ("block_w", "block_k", "num_warps", "num_stages")
DOWN_FIELDS = ("block_d", "down_unroll", "down_num_warps", "down_num_stages")
WHOLE_FIELDS = ("small_n", "index")
# The fields each path ignores (reset to the defaults, so that equal kernels compare equal).
IGNORED = {"fused": DOWN_FIELDS, "two_kernels": ("block_n", "atomics")}


MAX_REL_ERR = 2e-2   # bf16 weights and activations: the kernel's error is ~3e-3


def present(field):
  return flags.FLAGS[TUNABLES[field].name].present


def canonical(cfg, n):
  """cfg with small_n spelled out for n (16+ rows always use tl.dot: small_n changes nothing)
  and the fields its path ignores at their defaults, so that configurations computing the same
  thing compare equal."""
  cfg = dataclasses.replace(cfg, **{f: _DEFAULT[f] for f in IGNORED[cfg.fusion]})
  if kernel_rows(n, "broadcast")[1]:
    return dataclasses.replace(cfg, small_n="auto")
  return dataclasses.replace(cfg, small_n="dot" if kernel_rows(n, cfg.small_n)[1] else
                             "broadcast")


def flag_configs(n):
  """The Cartesian product of the tunable flags, for n tokens (distinct configs, in order)."""
  lists = {field: [PARSE[field](v) for v in flag.value] for field, flag in TUNABLES.items()}
  configs = []
  for values in itertools.product(*lists.values()):
    cfg = canonical(UnionFFNConfig(**dict(zip(lists, values))), n)
    if cfg not in configs:
      configs.append(cfg)
  return configs


def sweep_families(base, n):
  """{family: configs} for --sweep's first stage: the base, each kernel's options around it and
  the whole-op options; a field whose flag is given keeps the base's value."""
  def around(option):
    return canonical(dataclasses.replace(
        base, **{f: v for f, v in option.items() if not present(f)}), n)
  whole = [dict(index="xla" if base.index == "kernel" else "kernel")]
  if kernel_rows(n, base.small_n) == (1, False):   # one row: tl.dot on 16 padded rows instead
    whole.append(dict(small_n="dot"))
  families = {"base": [base]}
  if base.fusion == "fused" or not present("fusion"):
    fused = [dict(o, fusion="fused") for o in FUSED_OPTIONS]
    # Also with the public plgpu.atomic_add's ordering (a fence per atomic), to measure it.
    fused.append(dict(fused[0], atomics="acq_rel" if base.atomics == "relaxed" else "relaxed"))
    if not kernel_rows(n, "broadcast")[1]:
      # Under 16 tokens, the first option in the other row mode too: the fused path's atomics
      # grow with the rows, which tl.dot pads to 16 (n = 1: tl.dot's tiles may still win).
      rows_mode = "broadcast" if kernel_rows(n, base.small_n)[1] else "dot"
      fused.append(dict(fused[0], small_n=rows_mode))
    families["fused"] = [around(o) for o in fused]
  families.update({"up": [around(o) for o in UP_OPTIONS],
                   "down": [around(o) for o in DOWN_OPTIONS],
                   "whole": [around(o) for o in whole]})
  return families


def combine(base, picks):
  """The second stage's configs: base with the fields of each family taken from that family's
  pick, and (where the fused family was timed) its pick with the whole-op family's fields."""
  fields = {}
  for family, names in (("up", UP_FIELDS), ("down", DOWN_FIELDS), ("whole", WHOLE_FIELDS)):
    fields.update({f: getattr(picks[family], f) for f in names})
  combos = [dataclasses.replace(base, **fields)]
  if "fused" in picks and picks["fused"].fusion == "fused":
    combos.append(dataclasses.replace(
        picks["fused"], **{f: getattr(picks["whole"], f) for f in WHOLE_FIELDS}))
  return combos


def router_weights(rng, n, num_experts, sparsity):
  """float32 [n, E]: a random union of round(E * (1 - sparsity)) experts; every union expert
  active for at least one token, each token a random subset of the union (values in [0.1, 1])."""
  union_size = int(round(num_experts * (1 - sparsity)))
  union = rng.choice(num_experts, size=union_size, replace=False)
  active = np.zeros((n, num_experts), bool)
  active[:, union] = rng.random((n, union_size)) < 0.5
  active[rng.integers(0, n, size=union_size), union] = True
  return np.where(active, rng.uniform(0.1, 1.0, (n, num_experts)), 0.0).astype(np.float32)


def timeit(fn, *args):
  """Per-layer milliseconds: median over samples of reps back-to-back calls."""
  return timing.timeit(fn, *args, iters=_ITERS.value, reps=_REPS.value) / (
      _LAYERS.value * _PASSES.value)


def host_call_ms(*args):
  """Milliseconds per call of a jit that takes the same arguments and does almost nothing: the
  host's dispatch cost, which the GPU time per call must exceed for back-to-back calls to keep
  the GPU busy."""
  noop = jax.jit(lambda x, *stack: x + 1)
  return timeit(noop, *args) * _LAYERS.value * _PASSES.value


def chain(layer_fn):
  """jit of x -> layer_fn(x, *layer_args[l]) over the stack, --passes times. Returns (the last
  output, the first layer's output): one compile serves the timing and the error check."""
  def run(x, *stack):
    first = None
    for _ in range(_PASSES.value):
      for layer_args in zip(*stack):
        x = layer_fn(x, *layer_args)
        first = x if first is None else first
    return x, first
  return jax.jit(run)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def config_text(c):
  if c["fusion"] == "fused":
    return (f"fused w{c['block_w']} k{c['block_k']} n{c['block_n']} nw{c['num_warps']} "
            f"ns{c['num_stages']}; {c['small_n']} {c['index']} {c['atomics']}")
  return (f"up w{c['block_w']} k{c['block_k']} nw{c['num_warps']} ns{c['num_stages']}; "
          f"down d{c['block_d']} unroll{c['down_unroll']} nw{c['down_num_warps']} "
          f"ns{c['down_num_stages']}; {c['small_n']} {c['index']}")


def write(result, rows):
  if not _OUT.value:
    return
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".json", "w") as f:
    json.dump(result, f, indent=2)
  s = result["shapes"]
  with open(_OUT.value + ".md", "w") as f:
    f.write(f"# Union-of-experts FFN benchmark ({result['device']}, jax {result['jax']})\n\n")
    f.write(f"d_model {s['d_model']}, {s['experts']} experts of width {s['width']}, "
            f"{s['dtype']}; dense anchor {s['d_model']} x {s['experts'] * s['width']} x "
            f"{s['d_model']}; {s['layers']} layers x {s['passes']} passes per call; times are "
            f"per layer (median of {s['iters']} samples of {s['reps']} calls); "
            f"implementation {result['implementation']}.\n\n")
    f.write("| n | union sparsity | sparsejax us | dense us | speedup vs dense | bound us | "
            "ratio to bound | bytes floor us | GB/s | XLA gather us | rel err | config |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
      f.write(f"| {r['n_tokens']} | {r['union_sparsity']:.3f} | {r['sparsejax_ms'] * 1e3:.1f} "
              f"| {r['dense_ms'] * 1e3:.1f} | {r['speedup_vs_dense']:.2f}x | "
              f"{r['bound_ms'] * 1e3:.1f} | {r['ratio_to_bound']:.2f}x | "
              f"{r['bytes_floor_ms'] * 1e3:.1f} | {r['achieved_gbps']:.0f} | "
              f"{r['xla_gather_ms'] * 1e3:.1f} | {r['rel_err']:.1e} | "
              f"{config_text(r['config'])} |\n")
    host = {r["n_tokens"]: r["host_call_ms"] for r in rows}
    f.write(f"\nCommand: `{result['command']}`. Host dispatch per call (a no-op jit with the "
            "same arguments): " + ", ".join(f"n={n}: {t * 1e3:.0f} us" for n, t in host.items())
            + "; each row's kernel time per call over it: "
            + ", ".join(f"{r['gpu_to_host_time']:.1f}" for r in rows)
            + " (near 1 or below: dispatch-bound, raise --layers or --passes).\n")
    f.write("\nbound = dense time x active fraction (target: ratio to bound <= 1.3); bytes floor "
            f"= union weight bytes / {_HBM_GBPS.value:.0f} GB/s; GB/s = union weight bytes / "
            "sparsejax time; XLA gather = jnp.take of the union's experts from the same "
            "ExpertWeights (static union size) then two einsums. Configs are the requested "
            "blocks (the kernels clip block_k and block_n to their tile caps).\n")


def main(argv):
  del argv
  if _QUICK.value:
    # Tiny shapes in interpret mode on the CPU: a smoke test of the whole binary, not a timing.
    for flag, value in ((_D_MODEL, 64), (_EXPERTS, 16), (_WIDTH, 16), (_LAYERS, 1),
                        (_PASSES, 1), (_ITERS, 1), (_REPS, 1), (_N_TOKENS, ["1"]),
                        (_SPARSITIES, ["0.875"])):
      if not flags.FLAGS[flag.name].present:
        flags.FLAGS[flag.name].value = value
    if not _SWEEP.value and not present("fusion"):   # the smoke run covers both paths
      flags.FLAGS[TUNABLES["fusion"].name].value = ["two_kernels", "fused"]
  if _SWEEP.value:
    for flag, value in ((_ITERS, 7), (_MAX_MINUTES, 4.0)):
      if not flags.FLAGS[flag.name].present:
        flags.FLAGS[flag.name].value = value
    for field, flag in TUNABLES.items():
      if len(flag.value) != 1:
        raise ValueError(f"--{field}: with --sweep each tunable flag fixes its field to one "
                         f"value, got {flag.value}")
  for value in _SPARSITIES.value:
    if not 0 <= float(value) < 1:
      raise ValueError(f"--sparsities: each must be in [0, 1) (1 leaves no expert to time), "
                       f"got {value}")
  implementation = "interpret" if _QUICK.value else "pallas"
  d, num_experts, width = _D_MODEL.value, _EXPERTS.value, _WIDTH.value
  layers = _LAYERS.value
  dtype = jnp.bfloat16
  rng = np.random.default_rng(_SEED.value)
  keys = jax.random.split(jax.random.key(_SEED.value), 4 * layers)
  # Fresh random weights per layer (never zeros), scaled to keep activations O(1); the layer
  # layout is transposed to ExpertWeights here, once, and w_up dropped. FusedExpertWeights share
  # ExpertWeights' up_t and keep w_down as it is (the fused path's layout).
  to_experts = jax.jit(ExpertWeights.from_layer)
  experts, fused_experts = [], []
  for l in range(layers):
    w_down = (jax.random.normal(keys[4 * l + 1], (num_experts, width, d), jnp.float32)
              / np.sqrt(num_experts * width / 4)).astype(dtype)
    experts.append(to_experts(
        (jax.random.normal(keys[4 * l], (d, num_experts, width), jnp.float32)
         / np.sqrt(d)).astype(dtype), w_down))
    fused_experts.append(FusedExpertWeights(experts[-1].up_t, w_down))
  weights_for = {"two_kernels": experts, "fused": fused_experts}   # by UnionFFNConfig.fusion
  w1 = [(jax.random.normal(keys[4 * l + 2], (d, num_experts * width), jnp.float32)
         / np.sqrt(d)).astype(dtype) for l in range(layers)]
  w2 = [(jax.random.normal(keys[4 * l + 3], (num_experts * width, d), jnp.float32)
         / np.sqrt(num_experts * width)).astype(dtype) for l in range(layers)]
  jax.block_until_ready((experts, fused_experts, w1, w2))

  def dense_layer(x, w1, w2):
    h = jax.nn.silu(jnp.dot(x, w1, preferred_element_type=jnp.float32)).astype(dtype)
    return jnp.dot(h, w2, preferred_element_type=jnp.float32).astype(dtype)

  dense = chain(dense_layer)
  expert_bytes = 2 * d * width * jnp.dtype(dtype).itemsize          # w_up + w_down of one expert
  dense_bytes = num_experts * expert_bytes
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "command": "python -m experiments.bench_ffn " + " ".join(sys.argv[1:]),
            "implementation": implementation,
            "shapes": {"d_model": d, "experts": num_experts, "width": width, "dtype": "bfloat16",
                       "layers": layers, "passes": _PASSES.value, "iters": _ITERS.value,
                       "reps": _REPS.value},
            "hbm_gbps": _HBM_GBPS.value, "rows": [], "sweep": []}
  rows = result["rows"]
  started = time.perf_counter()
  n_tokens = list(map(int, _N_TOKENS.value))
  for k, n in enumerate(n_tokens):
    # Each n gets its share of --max_minutes (what an earlier n leaves over carries forward).
    share = 60 * _MAX_MINUTES.value / len(n_tokens)
    deadline = started + share * (k + 1)
    x = jax.random.normal(jax.random.key(n), (n, d), jnp.float32).astype(dtype)
    t_dense = timeit(dense, x, w1, w2)
    t_host = host_call_ms(x, [jnp.zeros((n, num_experts))] * layers, experts)
    print(f"n={n}: host dispatch {t_host * 1e3:.0f} us/call; "
          f"dense {t_dense * 1e3:.1f} us/layer ({dense_bytes / t_dense / 1e6:.0f} GB/s)",
          flush=True)
    per_sparsity = []
    for s in map(float, _SPARSITIES.value):
      a = [jnp.asarray(router_weights(rng, n, num_experts, s)) for _ in range(layers)]
      union = int(np.any(np.asarray(a[0]) != 0, axis=0).sum())
      gather = chain(lambda x, a, ew, u=union: union_ffn_gathered(x, a, ew, max_union=u))
      want = jax.jit(union_ffn_reference)(x, a[0], experts[0])
      per_sparsity.append((s, a, union, want, timeit(gather, x, a, experts)))
    measured = {}   # config -> [(time or None where wrong, rel err)] per sparsity

    def measure(configs, deadline):
      configs = [c for c in dict.fromkeys(configs) if c not in measured]
      for i, cfg in enumerate(configs):
        if measured and time.perf_counter() > deadline:
          print(f"  --max_minutes reached: {len(configs) - i} configs not timed", flush=True)
          result["skipped_configs"] = result.get("skipped_configs", 0) + len(configs) - i
          return
        kernel = chain(lambda x, a, ew, cfg=cfg: union_ffn(x, a, ew, config=cfg,
                                                           implementation=implementation))
        stack = weights_for[cfg.fusion]
        times, errs = [], []
        try:
          for s, a, union, want, _ in per_sparsity:
            err = rel_err(kernel(x, a, stack)[1], want)
            t = timeit(kernel, x, a, stack)
            if err > MAX_REL_ERR:      # a wrong result never counts as the fastest
              print(f"  {cfg} WRONG at sparsity {s}: rel err {err:.2e}", flush=True)
              t = None
            times.append(t)
            errs.append(err)
        except Exception as e:  # a configuration the Triton lowering rejects: record it, go on
          print(f"  {cfg} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
          result["sweep"].append({"n_tokens": n, "config": dataclasses.asdict(cfg),
                                  "error": f"{type(e).__name__}: {str(e)[:300]}"})
          continue
        measured[cfg] = list(zip(times, errs))
        result["sweep"].append({"n_tokens": n, "config": dataclasses.asdict(cfg),
                                "sparsejax_ms": dict(zip(_SPARSITIES.value, times)),
                                "rel_err": dict(zip(_SPARSITIES.value, errs))})
        print(f"  [{time.perf_counter() - started:.0f}s] {config_text(dataclasses.asdict(cfg))}"
              ": " + ", ".join("WRONG" if t is None else f"{t * 1e3:.1f}" for t in times)
              + " us", flush=True)

    def fastest(configs, j):
      timed = [(measured[c][j][0], c) for c in configs
               if c in measured and measured[c][j][0] is not None]
      return min(timed, key=lambda tc: tc[0], default=(None, None))[1]

    if _SWEEP.value:
      base = canonical(UnionFFNConfig(**{f: PARSE[f](v.value[0]) for f, v in TUNABLES.items()}),
                       n)
      families = sweep_families(base, n)
      # The first stage leaves a fifth of this n's share to the combinations (usually 1-2).
      measure([c for family in families.values() for c in family], deadline - share / 5)
      if base in measured:
        combos = []
        for j in range(len(per_sparsity)):
          picks = {family: fastest([base] + configs, j) or base
                   for family, configs in families.items() if family != "base"}
          combos += [canonical(c, n) for c in combine(base, picks)]
        measure(combos, deadline)
    else:
      measure(flag_configs(n), deadline)
    for j, (s, a, union, want, t_gather) in enumerate(per_sparsity):
      cfg = fastest(list(measured), j)
      if cfg is None:
        continue
      t, err = measured[cfg][j]
      active = union / num_experts
      union_bytes = union * expert_bytes
      bound = t_dense * active
      row = {"n_tokens": n, "union_sparsity": 1 - active, "requested_sparsity": s,
             "union_experts": union, "sparsejax_ms": t, "dense_ms": t_dense,
             "speedup_vs_dense": t_dense / t, "xla_gather_ms": t_gather,
             "bound_ms": bound, "ratio_to_bound": t / bound,
             "bytes_floor_ms": union_bytes / (_HBM_GBPS.value * 1e9) * 1e3,
             "achieved_gbps": union_bytes / t / 1e6, "dense_gbps": dense_bytes / t_dense / 1e6,
             "union_weight_mb": union_bytes / 2**20, "rel_err": err,
             "target_met": t / bound <= 1.3, "host_call_ms": t_host,
             # < 1.5: the host's dispatch may have limited the rate (raise --layers/--passes)
             "gpu_to_host_time": t * _LAYERS.value * _PASSES.value / t_host,
             "config": dataclasses.asdict(cfg)}
      rows.append(row)
      print(json.dumps(row), flush=True)
    write(result, rows)   # after each n: a run cut short keeps what it measured
  write(result, rows)


if __name__ == "__main__":
  app.run(main)
