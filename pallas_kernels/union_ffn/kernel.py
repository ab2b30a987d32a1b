"""The union-of-experts FFN as Pallas kernels (Triton lowering), for n <= 128 tokens: two kernels
(UnionFFNConfig.fusion="two_kernels", the default) or one fused launch ("fused", further below).

At decode-sized n the FFN is memory bound: its time is the bytes of expert weights read. Both
paths read only the union's experts (those active for at least one of the n tokens) and nothing
else, and the whole op is these launches.

Layout. The two kernels read the expert-major weights of reference.ExpertWeights, made once per
layer from the layer's w_up [d, E, width] / w_down [E, width, d] (inference weights are static):

  up_t   [E, width, d_model]   up_t[e, j, :]   = W_up_e[:, j], hidden unit j's d_model weights
  down_t [E, d_model, width]   down_t[e, c, :] = W_down_e[:, c], output column c's width weights

so every program streams contiguous kilobytes. In the layer layout one expert's up weights are
d_model rows of width * 2 bytes at a stride of E * width * 2 (32 KB at the benchmark's layer), and
a 16-unit chunk of them is 2048 pieces of 32 bytes; an H100 read 517 GB/s of such pieces (32.5 us
at n = 1, 87.5% union sparsity, against a 5 us bytes floor): each scattered 32-byte sector costs a
DRAM access of its own (a burst, mostly a row activation too), where contiguous blocks amortise
them over kilobytes.

Union index. Every program recomputes it from the router weights A [rows, E] (index="kernel",
no extra launch): mask[e] = any_t A[t, e] != 0, its inclusive prefix count p = cumsum(mask)
(tt.scan), count = p[E-1], and the u-th union expert = #{e : p[e] <= u} (a compare and a sum; no
sort, no scatter). index="xla" takes the same list precomputed by XLA (reference.union_index)
as an input instead: one more small launch, but each program then reads two ints instead of all
of A (16 KB at 32 rows, per program) and finds each down-loop expert with a load, not a reduction.

Up kernel, grid (width // block_w, E). Program (c, u) does nothing past the union's count (the
grid is static, sized for a union of every expert); below it, with e = union[u], it streams
up_t[e, c * block_w : (c+1) * block_w, :], one contiguous block of block_w * d_model * 2 bytes
(16 x 4 KB = 64 KB at the defaults and d 2048), in [block_w, block_k] tiles, accumulates
acc[rows, block_w] += x_tile @ tile^T in float32 and writes h[e, :, chunk] = SiLU(acc) * A[:, e]
(0 where A[t, e] = 0: the per-token mask) in the weights' dtype. The chunk axis is the grid's
fastest, so the live programs (small u) are dispatched first: a union of 16 experts (87.5% of 128)
is 16 x 128 / 16 = 128 live programs, one per SM. No split over d_model (SiLU needs the complete
sum).

Down kernel, grid (d_model // block_d,). Program j owns the output columns j * block_d ... and
loops over the union: for each expert e it reads down_t[e, j * block_d : (j+1) * block_d, :], one
contiguous block_d * width * 2 bytes (16 x 256 B = 4 KB at the defaults), and h[e] (h is
[E, rows, width]: contiguous too, and L2-resident), and accumulates acc[rows, block_d] +=
h[e] @ tile^T in float32, `down_unroll` experts per loop iteration: their index lookups, then
their loads, then their math, so the loads are in flight together even where Triton does not
software-pipeline the loop (the broadcast path below; one 4 KB tile at a time cannot cover HBM
latency). It writes y[:, columns] in x.dtype: every column has one owner, so no atomics, no
partial sums, no second pass; d 2048 / 16 = 128 programs, each reading union x 4 KB (64 KB at a
union of 16).

So at the defaults and 87.5% sparsity both kernels run 128 programs of 64 KB each: 16 MB in all,
the union's bytes, a 5.0 us floor at 3.35 TB/s (2.5 us a kernel, plus the launch gaps). With one
program per SM, an SM's share of HBM is ~25 GB/s, i.e. ~25 KB in flight at ~1 us of latency:
what block_k (up: one load of block_w x block_k, 32 KB at the defaults) and down_unroll (down:
that many 4 KB tiles) provide where Triton's pipelining (num_stages) does not.

Measured (H100, experiments/results/bench_ffn.md, best config per row): n = 1 at 87.5% union
sparsity 17.1 us (2.3x the 7.5 us bound of dense x active fraction, 3.5x faster than dense), at
95% 11.6 us against a 1.9 us bytes floor. Time grows with the union at ~0.5 us per expert (its
1 MB at ~2 TB/s) on top of a ~8.5 us per-layer constant: two launches and their tails, and the
up grid's (width / block_w) x E programs of which only the union's do work. Fusing both
projections into one launch is what the constant asks for: the fused path below.

Fused path (fusion="fused"; weights reference.FusedExpertWeights: up_t as above, and down =
w_down [E, width, d_model] itself, each hidden unit's d_model output weights one contiguous row).
One launch on the up kernel's grid (width // block_w, E), chunk axis fastest. Program (c, u)
below the union's count computes its h [rows, block_w] exactly as the up kernel does (the same
code, rounded to the weights' dtype), then, instead of storing it, multiplies it at once by the
down weights of the same block_w hidden units: rows e * width + c * block_w ... of w_down, again
one contiguous block_w x d_model block (64 KB at the defaults), read in [block_w, block_n] tiles.
Each tile gives a [rows, block_n] float32 partial sum of y, which the program adds into the
output with atomics (tl.atomic_rmw fadd: every program contributes to every output column, so
there is no single owner), relaxed by default: no ordering is needed, and acquire-release (the
public plgpu.atomic_add's) puts a GPU-scope fence before every atomic (see _atomic_add). The
output is a float32 [rows, d_model] buffer that starts as zeros (an aliased input); the op casts
it to x.dtype (in a model that cast fuses into the residual add).

What it was built to remove: the second launch (its tail and gap), the h round trip through
memory, and the down-grid programs that loop over the union serially; the
bytes are the same union weights (each live program reads 64 KB of up and 64 KB of down weights,
in two contiguous streams). What it costs: rows * d_model float32 atomics per live program, e.g.
128 programs x 2048 = 262k at n = 1 and 87.5% union sparsity (relaxed: 4-wide fire-and-forget
reductions, resolved in L2, where the 8 KB output lives), and 16x more at 16 padded rows.

Measured (H100, experiments/results/bench_ffn.md, --sweep, best config per row; the dense FFN
58.9 us in the same run):
  n = 1 (broadcast rows): the fused path wins at every sparsity. 87.5%: 13.0 us against 16.6 us
    for the best two-kernel config (4.5x faster than dense; 1.76x the bound); 50%: 29.8 us
    (1.01x the bound), 70%: 20.9 us (1.20x), 95%: 9.5 us (6.2x faster than dense). A line
    through the four points: ~0.35 us per union expert (its 1 MB at ~2.9 TB/s) on top of ~7.4
    us, against 0.51 us per expert on top of ~7.9 us for the two kernels in the same run. So the
    fusion bought bandwidth (the serial down loop and the h round trip), not the constant, which
    is what still stands between 13 us and the 6x target (9.8 us): the launch itself, the
    output's zeroing and cast (two small XLA ops), and the idle programs past the union.
  n = 8 and 32 (16+ rows, tl.dot): fused wins at 50-70% (n = 8: 33.6 vs 39.2 us) and loses at
    87.5-95% (n = 32, 87.5%: 27.5 vs 17.1 us), where the 16x atomics of the padded rows outweigh
    the launch they save. So: FusedExpertWeights + fusion="fused" for single-token decode, the
    two kernels for verification batches at high sparsity.
  Acquire-release atomics: 17.4 us against 14.2 us relaxed (n = 1, 87.5%, same config). Loading
    the first down tile before the up reduction (both streams in flight at once) was tried and
    measured no faster (13.4-13.7 us either way, experiments/results/bench_ffn_prefetch.md);
    it is not kept. A persistent grid over the union's (expert, chunk) pairs would remove the
    idle programs; the output's zeroing could move into the previous layer.
(Before a GPU was used, the fused kernel's Triton IR was compiled with Triton 3.5.1 for sm_90:
no spills, its relaxed atomics REDG.E.ADD.F32x4.)

Rows. tl.dot needs M >= 16. With `small_n="broadcast"`, fewer than 16 (padded) rows are computed
as a broadcast multiply and a sum over K in float32 on the CUDA cores (the work is tiny; the weight
tiles are the same; for 2-8 rows the [rows, N, K] product is capped at 8192 elements by shrinking
block_k and the down kernel's width chunk, which makes its tiles small). With `small_n="dot"` they
are padded to 16 rows for tl.dot. "auto" (default) takes broadcast for one row (n = 1: no
padding, one 2-D product per tile, summed along its contiguous axis) and tl.dot for 2-15. 16 rows
and up always use tl.dot. The op pads rows to a power of two (Triton tensors are powers of two)
and to 16 for tl.dot: n = 1 and 32 need no padding. The fused path's down tiles are [block_w,
block_n] (N contiguous, K = block_w); its broadcast product sums over block_w, and its block_n is
capped so that the tl.dot tile stays within MAX_DOT_TILE and its [rows, block_n] float32 result,
or the [rows, block_w, block_n] broadcast product at 2-8 rows, within MAX_PRODUCT.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax import tree_util
from jax._src import core as jax_core
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as triton_lowering
from jax._src.pallas.triton import primitives as triton_primitives
from jax._src.state import discharge as state_discharge
from jax._src.state import primitives as state_primitives
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SMALL_N_MODES = ("auto", "broadcast", "dot")
INDEX_MODES = ("kernel", "xla")
FUSION_MODES = ("two_kernels", "fused")
ATOMICS_MODES = ("relaxed", "acq_rel")
WARPS = (1, 2, 4, 8, 16)
MIN_DOT_ROWS = 16      # tl.dot's minimum M (and N, K)
MAX_ROWS = 128         # decode / verification sizes; longer inputs go to the reference path
MAX_DOT_TILE = 16384   # elements of a tl.dot operand tile (32 KB in bf16), per pipeline stage
MAX_PRODUCT = 8192     # elements of a float32 tile in registers: a broadcast product [rows, N, K]
                       # (rows 2..8), the fused path's tl.dot result [rows, block_n]


def next_power_of_2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _fit(block: int, dim: int) -> int:
  """The largest power of two <= block that divides dim (dim a multiple of 16)."""
  return min(block, dim & -dim)


@dataclasses.dataclass(frozen=True)
class UnionFFNConfig:
  """Tunables of the kernels (static: each distinct config compiles once).

  fusion:   "two_kernels" | "fused": the up and down kernels (they read ExpertWeights), or one
            launch on the up kernel's grid that multiplies each hidden chunk by its down weights
            at once and adds into the output with atomics (it reads FusedExpertWeights); see the
            module docstring. The fused path reads block_w, block_k, num_warps, num_stages (its
            grid and up half are the up kernel's), block_n, atomics, small_n and index; the down
            kernel's fields do nothing there, and block_n and atomics nothing for two kernels.

  block_w:  up kernel, hidden units per program: programs = union * width / block_w, each
            reading block_w * d_model contiguous weights. At 16 a union of 16 experts of width
            128 is 128 programs, about one per H100 SM (132).
  block_k:  up kernel, d_model elements per tile (a tile is block_w rows of block_k contiguous
            elements): the bytes one load has in flight where Triton does not pipeline (one row)
            and per pipeline stage where it does (tl.dot). Clipped so that tl.dot operand tiles
            stay <= 16k elements.
  num_warps, num_stages: the up kernel's Triton warps and software-pipelining depth.
  block_d:  down kernel, output columns per program: programs = d_model / block_d, each reading
            block_d * width contiguous weights per union expert.
  down_unroll: down kernel, union experts per loop iteration: their loads are emitted back to
            back, so `down_unroll` tiles (4 KB each at the defaults) are in flight together even
            where Triton does not pipeline the loop (the broadcast path).
  down_num_warps, down_num_stages: the same as num_warps / num_stages for the down kernel, whose
            tiles ([block_d, width], 4 KB) are 8x smaller than the up kernel's.
  block_n:  fused path, output columns per step of its loop over d_model: each step reads a
            [block_w, block_n] tile of down weights (block_w rows of block_n contiguous elements)
            and adds a [rows, block_n] float32 tile into the output. Clipped like block_k.
  atomics:  fused path, "relaxed" | "acq_rel": the memory ordering of its atomic adds (see
            _atomic_add; "acq_rel" is plgpu.atomic_add's, which fences every atomic).
  small_n:  "auto" | "broadcast" | "dot": how fewer than 16 rows are computed (see the module
            docstring); "auto": broadcast for one row, tl.dot on 16 padded rows for 2-15.
  index:    "kernel" | "xla": where the union list is computed (see the module docstring).
  Blocks are powers of two >= 16; each is clipped to the largest power of two dividing its axis.
  """
  block_w: int = 16
  block_k: int = 1024
  num_warps: int = 4
  num_stages: int = 3
  block_d: int = 16
  down_unroll: int = 4
  down_num_warps: int = 4
  down_num_stages: int = 3
  block_n: int = 1024
  small_n: str = "auto"
  index: str = "kernel"
  fusion: str = "two_kernels"
  atomics: str = "relaxed"

  def __post_init__(self):
    for name in ("block_w", "block_k", "block_d", "block_n"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"UnionFFNConfig: {name} must be a power of two >= 16, got {value!r}")
    for name in ("down_unroll", "num_stages", "down_num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"UnionFFNConfig: {name} must be an int >= 1, got {value!r}")
    for name in ("num_warps", "down_num_warps"):
      if getattr(self, name) not in WARPS:
        raise ValueError(f"UnionFFNConfig: {name} must be one of {WARPS}, got "
                         f"{getattr(self, name)!r}")
    if self.small_n not in SMALL_N_MODES:
      raise ValueError(f"UnionFFNConfig: small_n must be one of {SMALL_N_MODES}, got "
                       f"{self.small_n!r}")
    if self.index not in INDEX_MODES:
      raise ValueError(f"UnionFFNConfig: index must be one of {INDEX_MODES}, got {self.index!r}")
    if self.fusion not in FUSION_MODES:
      raise ValueError(f"UnionFFNConfig: fusion must be one of {FUSION_MODES}, got "
                       f"{self.fusion!r}")
    if self.atomics not in ATOMICS_MODES:
      raise ValueError(f"UnionFFNConfig: atomics must be one of {ATOMICS_MODES}, got "
                       f"{self.atomics!r}")


def kernel_rows(n: int, small_n: str) -> tuple[int, bool]:
  """(rows the kernels run on, whether they use tl.dot) for n tokens."""
  rows = next_power_of_2(n)
  if rows >= MIN_DOT_ROWS:
    return rows, True
  if small_n == "dot" or (small_n == "auto" and rows > 1):
    return MIN_DOT_ROWS, True
  return rows, False


def _union(a_ref, idx_ref):
  """(count, expert_of): the union size and u -> the u-th union expert (int32 scalars)."""
  if idx_ref is not None:                                    # index="xla": precomputed list
    return idx_ref[0], lambda u: idx_ref[u + 1]
  active = jnp.max((a_ref[...].astype(jnp.float32) != 0).astype(jnp.int32), axis=0)   # [E]
  prefix = lax.cumsum(active, axis=0)                        # inclusive prefix count
  count = jnp.sum(active)
  return count, lambda u: jnp.sum((prefix <= u).astype(jnp.int32))


def _matmul(a, b, use_dot, trans_b):
  """a [rows, K] @ b -> float32 [rows, N], b [N, K] (trans_b: the up kernel's and the down
  kernel's tiles, K contiguous) or [K, N] (the fused path's down tiles, N contiguous).

  tl.dot for rows >= 16; for fewer rows a broadcast multiply and a sum over K in float32 on the
  CUDA cores. One row stays 2-D (no [1, ., .] padding): [1, K] against [N, K], or a [K, 1] column
  against [K, N]."""
  if use_dot:
    return plgpu.dot(a.astype(b.dtype), b, trans_b=trans_b)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  if a.shape[0] == 1:
    if trans_b:
      return jnp.sum(a * b, axis=1)[None, :]
    return jnp.sum(a.reshape(-1, 1) * b, axis=0)[None, :]
  if trans_b:
    return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
  return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _hidden_chunk(x_ref, a_ref, up_ref, e, chunk, *, width, d_model, block_k, block_w,
                  use_dot):
  """h [rows, block_w] = SiLU(x @ W_up_e[:, chunk units]) * A[:, e] (0 where A[t, e] = 0: the
  per-token mask) in up_ref's dtype: the up projection of one program, shared by the up kernel
  (which stores it) and the fused kernel (which multiplies it by its down weights at once).
  It streams up_t[e, chunk units, :], one contiguous block_w x d_model block, in [block_w,
  block_k] tiles and accumulates in float32."""
  units = pl.ds(e * width + chunk * block_w, block_w)        # rows of up_t [E * width, d]

  def step(kb, acc):
    ks = pl.ds(kb * block_k, block_k)
    return acc + _matmul(x_ref[:, ks], up_ref[units, ks], use_dot, trans_b=True)

  rows = x_ref.shape[0]
  acc = lax.fori_loop(0, d_model // block_k, step, jnp.zeros((rows, block_w), jnp.float32))
  a = a_ref[:, pl.ds(e, 1)].astype(jnp.float32)             # [rows, 1]
  # Rounded to the weights' dtype as the two-kernel path stores h: both paths give the same
  # numbers up to the order of the float32 sums.
  return jnp.where(a != 0, jax.nn.silu(acc) * a, 0.0).astype(up_ref.dtype)


def _up_kernel(*refs, has_index, rows, width, d_model, block_k, block_w, use_dot):
  if has_index:
    x_ref, a_ref, idx_ref, w_ref, *rest = refs
  else:
    (x_ref, a_ref, w_ref, *rest), idx_ref = refs, None
  h_ref = rest[-1]                   # (with poisoned outputs, the aliased input comes first)
  chunk, u = pl.program_id(0), pl.program_id(1)
  count, expert_of = _union(a_ref, idx_ref)

  @pl.when(u < count)
  def _():
    e = expert_of(u)
    h_ref[pl.ds(e * rows, rows), pl.ds(chunk * block_w, block_w)] = _hidden_chunk(
        x_ref, a_ref, w_ref, e, chunk, width=width, d_model=d_model, block_k=block_k,
        block_w=block_w, use_dot=use_dot).astype(h_ref.dtype)


def _down_kernel(*refs, has_index, rows, width, d_model, block_d, block_h, unroll, use_dot):
  if has_index:
    h_ref, a_ref, idx_ref, w_ref, *rest = refs
  else:
    (h_ref, a_ref, w_ref, *rest), idx_ref = refs, None
  out_ref = rest[-1]
  column_block = pl.program_id(0)
  count, expert_of = _union(a_ref, idx_ref)

  def step(i, acc):
    # The iteration's index lookups first (with index="kernel" each is a reduction over E, with
    # barriers), then all its loads, then the math: the loads are emitted back to back, so they
    # are in flight together instead of each waiting behind the previous expert's arithmetic.
    positions = [i * unroll + j for j in range(unroll)]
    # Past the union's end (the last iteration of a ragged unroll): reload the union's last
    # expert (a cache hit) and drop its contribution, rather than branch.
    experts = [expert_of(jnp.minimum(u, count - 1)) for u in positions]
    tiles = []
    for u, e in zip(positions, experts):
      columns = pl.ds(e * d_model + column_block * block_d, block_d)   # rows of down_t
      for c in range(width // block_h):
        width_chunk = pl.ds(c * block_h, block_h)
        tiles.append((u, h_ref[pl.ds(e * rows, rows), width_chunk], w_ref[columns, width_chunk]))
    for u, h, w in tiles:
      if unroll > 1:
        h = jnp.where(u < count, h, jnp.zeros_like(h))
      acc = acc + _matmul(h, w, use_dot, trans_b=True)
    return acc

  acc = lax.fori_loop(0, lax.div(count + (unroll - 1), unroll), step,
                      jnp.zeros((rows, block_d), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


# A relaxed atomic add. plgpu.atomic_add lowers to tt.atomic_rmw with acquire-release order at GPU
# scope, which ptxas (sm_90) compiles to MEMBAR.ALL.GPU + ATOMG + CCTL.IVALL per 4-wide atomic
# instruction: each waits for the thread's previous one (an L2 round trip each), 4 per program at
# n = 1 and 64 at 16 rows (16 per thread per [16, 512] tile, 4 tiles). The fused path needs no
# ordering at all (its output is read after the kernel ends), so this primitive is atomic_rmw's
# (the same abstract evaluation, and the same discharge rule, which interpret mode runs) with a
# relaxed lowering, which ptxas turns into fire-and-forget REDG.E.ADD.F32x4 (no fences). It uses
# JAX internals (jax._src.pallas.triton, as of jax 0.11); UnionFFNConfig(atomics="acq_rel") takes
# the public plgpu.atomic_add instead.
_relaxed_atomic_add_p = jax_core.Primitive("union_ffn_relaxed_atomic_add")
_relaxed_atomic_add_p.def_effectful_abstract_eval(triton_primitives._atomic_abstract_eval)
state_discharge.register_discharge_rule(_relaxed_atomic_add_p)(
    triton_primitives._atomic_rmw_discharge_rule)


@triton_lowering.register_lowering(_relaxed_atomic_add_p)
def _relaxed_atomic_add_lowering(ctx, *args_flat, args_tree, atomic_type):
  del atomic_type                                           # always ADD
  block_info, *_ = ctx.block_infos
  ptr, (indexer,), value, _ = args_tree.unflatten(args_flat)
  *_, value_aval, _ = args_tree.unflatten(ctx.avals_in)
  ptr = triton_lowering._compute_pointers_from_indices(ptr, block_info, indexer)
  return triton_lowering._atomic_rmw(
      tt_dialect.RMWOp.FADD, ptr, triton_lowering._ensure_ir_value(value, value_aval),
      semantic=tt_dialect.MemSemantic.RELAXED)


def _atomic_add(ref, idx, value, atomics):
  """ref[idx] += value, atomically (float32; idx a tuple of pl.ds, no mask)."""
  if atomics == "acq_rel":
    plgpu.atomic_add(ref, idx, value)
    return
  ref, transforms = state_primitives.get_ref_and_transforms(ref, idx, "atomic_add")
  args_flat, args_tree = tree_util.tree_flatten((ref, transforms, value, None))
  _relaxed_atomic_add_p.bind(*args_flat, args_tree=args_tree,
                             atomic_type=triton_primitives.AtomicOpType.ADD)


def _fused_kernel(*refs, has_index, width, d_model, block_k, block_w, block_n, use_dot,
                  atomics):
  if has_index:
    x_ref, a_ref, idx_ref, up_ref, down_ref, _, out_ref = refs
  else:
    (x_ref, a_ref, up_ref, down_ref, _, out_ref), idx_ref = refs, None
  chunk, u = pl.program_id(0), pl.program_id(1)
  count, expert_of = _union(a_ref, idx_ref)

  @pl.when(u < count)
  def _():
    e = expert_of(u)
    units = pl.ds(e * width + chunk * block_w, block_w)      # rows of down [E * width, d]
    rows = pl.ds(0, x_ref.shape[0])
    h = _hidden_chunk(x_ref, a_ref, up_ref, e, chunk, width=width, d_model=d_model,
                      block_k=block_k, block_w=block_w, use_dot=use_dot)

    # This chunk's down weights are the same block_w units' rows of w_down: one contiguous
    # block_w x d_model block, read in [block_w, block_n] tiles. Every program adds into every
    # output column, hence the atomics (float32: Pallas' atomics take no bf16, and float32 sums
    # keep the result as the two-kernel path's).
    @pl.loop(0, d_model // block_n)
    def _(j):
      columns = pl.ds(j * block_n, block_n)
      _atomic_add(out_ref, (rows, columns),
                  _matmul(h, down_ref[units, columns], use_dot, trans_b=False), atomics)


def _up_blocks(config, rows, width, d_model):
  """(block_w, block_k) of the up kernel's grid and tiles, which the fused kernel shares."""
  block_w = _fit(config.block_w, width)
  block_k = _fit(config.block_k, d_model)
  # Caps (all powers of two, so the clipped blocks still divide their axes).
  if rows >= MIN_DOT_ROWS:        # tl.dot operand tiles in shared memory, per pipeline stage
    block_k = min(block_k, max(16, MAX_DOT_TILE // max(rows, block_w)))
  elif rows > 1:                  # the [rows, N, K] product lives in registers
    block_k = min(block_k, max(16, MAX_PRODUCT // (rows * block_w)))
  return block_w, block_k


def _full(shape):
  """BlockSpec of a whole array (kernels index it themselves with pl.ds)."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("config", "interpret", "poison"))
def union_ffn_kernels(x, a, index, up_t, down_t, *, config: UnionFFNConfig,
                      interpret: bool = False, poison: bool = False):
  """The two kernels on prepared inputs.

  x [rows, d] (rows from kernel_rows), a [rows, E'] float router weights (E' >= E; a power of
  two with index="kernel"), index int32 [L] from reference.union_index (index="xla"; ignored
  otherwise, pass None), up_t [E, width, d] and down_t [E, d, width] (ExpertWeights' fields).
  d and width must be multiples of 16. Returns y [rows, d] in x.dtype. poison=True runs on
  NaN-filled h and output buffers (tests: a tile the kernels leave unwritten, or an h column the
  down kernel reads but the up kernel did not write, shows up as NaN).
  """
  rows, d_model = x.shape
  num_experts, width, _ = up_t.shape
  use_dot = rows >= MIN_DOT_ROWS
  block_w, block_k = _up_blocks(config, rows, width, d_model)
  block_d = _fit(config.block_d, d_model)
  block_h = width                 # the down kernel's width chunk: whole rows of down_t
  if use_dot:                     # tl.dot operand tiles in shared memory, per pipeline stage
    block_h = _fit(max(16, MAX_DOT_TILE // max(rows, block_d)), width)
  elif rows > 1:                  # the [rows, N, K] product lives in registers
    block_h = _fit(max(16, MAX_PRODUCT // (rows * block_d)), width)
  has_index = config.index == "xla"
  index_in = [index] if has_index else []
  # Reshapes of contiguous arrays: free. Rows of up_t2 are (expert, hidden unit), of down_t2
  # (expert, output column); each kernel slices them with one pl.ds per tile.
  up_t2 = up_t.reshape(num_experts * width, d_model)
  down_t2 = down_t.reshape(num_experts * d_model, width)

  # h is expert-major too ([E * rows, width]: expert e's rows are one block, 256 B per row at
  # width 128), so the down kernel reads each expert's activations contiguously.
  h_shape = jax.ShapeDtypeStruct((num_experts * rows, width), down_t.dtype)
  up_inputs = [x, a, *index_in, up_t2]
  up_aliases = {}
  if poison:
    up_inputs.append(jnp.full(h_shape.shape, jnp.nan, h_shape.dtype))
    up_aliases = {len(up_inputs) - 1: 0}
  h = pl.pallas_call(
      functools.partial(_up_kernel, has_index=has_index, rows=rows, width=width,
                        d_model=d_model, block_k=block_k, block_w=block_w, use_dot=use_dot),
      grid=(width // block_w, num_experts),
      in_specs=[_full(v.shape) for v in up_inputs],
      out_specs=_full(h_shape.shape),
      out_shape=h_shape,
      input_output_aliases=up_aliases,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="union_ffn_up",
  )(*up_inputs)

  out_shape = jax.ShapeDtypeStruct((rows, d_model), x.dtype)
  out_spec = pl.BlockSpec((rows, block_d), lambda j: (0, j))
  down_inputs = [h, a, *index_in, down_t2]
  down_specs = [_full(v.shape) for v in down_inputs]
  down_aliases = {}
  if poison:
    down_inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
    down_specs.append(out_spec)
    down_aliases = {len(down_inputs) - 1: 0}
  return pl.pallas_call(
      functools.partial(_down_kernel, has_index=has_index, rows=rows, width=width,
                        d_model=d_model, block_d=block_d, block_h=block_h,
                        unroll=config.down_unroll, use_dot=use_dot),
      grid=(d_model // block_d,),
      in_specs=down_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      input_output_aliases=down_aliases,
      compiler_params=plgpu.CompilerParams(num_warps=config.down_num_warps,
                                           num_stages=config.down_num_stages),
      interpret=interpret,
      name="union_ffn_down",
  )(*down_inputs)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def union_ffn_fused_kernel(x, a, index, up_t, down, *, config: UnionFFNConfig,
                           interpret: bool = False):
  """The fused kernel on prepared inputs: as union_ffn_kernels, with down [E, width, d]
  (FusedExpertWeights.down, the layer's w_down). Returns y [rows, d] in float32, the atomics'
  dtype (the caller casts). There is no poison mode: the output must start at zeros, which the
  programs add into, and there is no intermediate buffer (see the module docstring).
  """
  rows, d_model = x.shape
  num_experts, width, _ = up_t.shape
  use_dot = rows >= MIN_DOT_ROWS
  block_w, block_k = _up_blocks(config, rows, width, d_model)
  block_n = _fit(config.block_n, d_model)
  if use_dot:      # the down tile in shared memory, and the [rows, block_n] result in registers
    block_n = min(block_n, max(16, MAX_DOT_TILE // block_w), max(16, MAX_PRODUCT // rows))
  elif rows > 1:   # the [rows, block_w, block_n] product lives in registers
    block_n = min(block_n, max(16, MAX_PRODUCT // (rows * block_w)))
  has_index = config.index == "xla"
  index_in = [index] if has_index else []
  # Both weights reshaped (free) to rows of (expert, hidden unit): a program's up and down
  # weights are the same rows of the two arrays.
  zeros = jnp.zeros((rows, d_model), jnp.float32)
  inputs = [x, a, *index_in, up_t.reshape(num_experts * width, d_model),
            down.reshape(num_experts * width, d_model), zeros]
  return pl.pallas_call(
      functools.partial(_fused_kernel, has_index=has_index, width=width, d_model=d_model,
                        block_k=block_k, block_w=block_w, block_n=block_n, use_dot=use_dot,
                        atomics=config.atomics),
      grid=(width // block_w, num_experts),
      in_specs=[_full(v.shape) for v in inputs],
      out_specs=_full(zeros.shape),
      out_shape=jax.ShapeDtypeStruct(zeros.shape, zeros.dtype),
      input_output_aliases={len(inputs) - 1: 0},       # the output starts as these zeros
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="union_ffn_fused",
  )(*inputs)
