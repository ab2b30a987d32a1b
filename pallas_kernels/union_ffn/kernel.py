"""The union-of-experts FFN as two Pallas kernels (Triton lowering), for n <= 128 tokens.

At decode-sized n the FFN is memory bound: its time is the bytes of expert weights read. Both
kernels read only the union's experts (those active for at least one of the n tokens) and nothing
else, and the whole op is these two launches (plus, with down_groups > 1, one small XLA sum).

Union index. Every program recomputes it from the router weights A [rows, E] (index="kernel",
no extra launch): mask[e] = any_t A[t, e] != 0, its inclusive prefix count p = cumsum(mask)
(tt.scan), count = p[E-1], and the u-th union expert = #{e : p[e] <= u} (a compare and a sum; no
sort, no scatter). index="xla" takes the same list precomputed by XLA (reference.union_index)
as an input instead: one more small launch, but programs then read two ints instead of A.

Up kernel, grid (width // block_w, expert_slots). Program (c, s) handles union positions
u = s, s + slots, ... < count (one at most with the default slots = E; the grid is static and
sized for the worst case, programs past the count do nothing). For expert e = union[u] it
streams w_up[:, e, c * block_w : (c+1) * block_w] in [block_k, block_w] tiles over d_model,
accumulates x @ tile in float32, and writes h[:, e, chunk] = SiLU(acc) * A[:, e] (0 where
A[t, e] = 0: the per-token mask) in the weights' dtype. The chunk axis is the grid's fastest, so
the live programs (small s) are dispatched first, and with block_w = 16 a union of 16 experts
already fills 128 SMs; no split over d_model here (SiLU needs the complete sum).

Down kernel, grid (d_model // block_d, down_groups). Program (j, g) owns the output columns
j * block_d ... and the union positions u = g, g + G, ...: for each it loads the [width, block_d]
slice of w_down[e] (in block_h-row tiles) and the matching h columns, and accumulates in float32,
`down_unroll` experts per loop iteration (their loads are independent, so in flight together).
The reduction over experts: with down_groups = 1 (default) each program sums its whole column
block over the union and writes y directly in x.dtype (no atomics, no second pass; d_model /
block_d = 128 programs at d 2048, block_d 16). down_groups = G > 1 is split-K over expert groups:
program (j, g) writes a float32 partial [G, rows, d] and XLA sums the G partials (one fused
reduce+cast, G * rows * d * 4 bytes, 256 KB at G 4, rows 16), for when the union is long and
the column blocks alone do not fill the GPU. Float atomics (plgpu.atomic_add) would need a zeroed
float32 output plus a cast pass, i.e. the same launches as the partials, and a nondeterministic
summation order, so they are not used.

Rows. tl.dot needs M >= 16. With `small_n="broadcast"`, fewer than 16 (padded) rows are computed
as a broadcast multiply and a sum over K in float32 on the CUDA cores (the work is tiny; the weight
tiles are the same; for 2-8 rows the [rows, K, N] product is capped at 8192 elements by shrinking
block_k / block_h, which makes its tiles small). With `small_n="dot"` they are padded to 16 rows
for tl.dot. "auto" (default) takes broadcast for one row (n = 1: no padding, one 2-D product per
tile) and tl.dot for 2-15. 16 rows and up always use tl.dot. The op pads rows to a power of two
(Triton tensors are powers of two) and to 16 for tl.dot: n = 1 and 32 need no padding.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SMALL_N_MODES = ("auto", "broadcast", "dot")
INDEX_MODES = ("kernel", "xla")
MIN_DOT_ROWS = 16      # tl.dot's minimum M (and N, K)
MAX_ROWS = 128         # decode / verification sizes; longer inputs go to the reference path
MAX_X_TILE = 16384     # elements of an x tile [rows, block_k] (32 KB in bf16), per pipeline stage
MAX_PRODUCT = 8192     # elements of a broadcast product [rows, K, N] (rows 2..8, registers)


def next_power_of_2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _fit(block: int, dim: int) -> int:
  """The largest power of two <= block that divides dim (dim a multiple of 16)."""
  return min(block, dim & -dim)


@dataclasses.dataclass(frozen=True)
class UnionFFNConfig:
  """Tunables of the two kernels (static: each distinct config compiles once).

  block_k:  up kernel, d_model rows per w_up tile (clipped so the x tile stays <= 16k elements).
  block_w:  up kernel, expert-width columns per program (programs = union * width / block_w).
  block_d:  down kernel, d_model output columns per program (programs = d_model / block_d * G).
  block_h:  down kernel, expert-width rows per w_down tile.
  down_groups: G, split-K of the down projection over union positions (G > 1: float32 partials
            summed by XLA). 1 writes the output directly.
  expert_slots: up kernel programs along the union (each loops over u = s, s + slots, ...);
            None = num_experts (every union expert gets its own programs, none loop).
  small_n:  "auto" | "broadcast" | "dot": how fewer than 16 rows are computed (see the module
            docstring); "auto": broadcast for one row, tl.dot on 16 padded rows for 2-15.
  index:    "kernel" | "xla": where the union list is computed.
  num_warps, num_stages: Triton's warps per program and software-pipelining depth (up kernel).
  down_num_warps, down_num_stages: the same for the down kernel (None: as the up kernel's). Its
            tiles are small ([block_h, block_d], 4 KB at 128 x 16 bf16), so its depth sets how
            many bytes each program keeps in flight.
  down_unroll: union experts per down-kernel loop iteration (independent loads in flight even
            where Triton does not software-pipeline, as for the broadcast path's loads).
  Blocks are powers of two >= 16; each is clipped to the largest power of two dividing its axis.
  """
  block_k: int = 512
  block_w: int = 16
  block_d: int = 16
  block_h: int = 128
  down_groups: int = 1
  expert_slots: int | None = None
  small_n: str = "auto"
  index: str = "kernel"
  num_warps: int = 4
  num_stages: int = 3
  down_num_warps: int | None = None
  down_num_stages: int | None = 4
  down_unroll: int = 2

  def __post_init__(self):
    for name in ("block_k", "block_w", "block_d", "block_h"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"UnionFFNConfig: {name} must be a power of two >= 16, got {value!r}")
    for name in ("down_groups", "down_unroll"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"UnionFFNConfig: {name} must be an int >= 1, got {value!r}")
    if self.expert_slots is not None and (not isinstance(self.expert_slots, int)
                                          or self.expert_slots < 1):
      raise ValueError(f"UnionFFNConfig: expert_slots must be None or an int >= 1, got "
                       f"{self.expert_slots!r}")
    if self.small_n not in SMALL_N_MODES:
      raise ValueError(f"UnionFFNConfig: small_n must be one of {SMALL_N_MODES}, got "
                       f"{self.small_n!r}")
    if self.index not in INDEX_MODES:
      raise ValueError(f"UnionFFNConfig: index must be one of {INDEX_MODES}, got {self.index!r}")
    for name in ("num_warps", "down_num_warps"):
      value = getattr(self, name)
      if value not in (1, 2, 4, 8, 16) and not (name.startswith("down") and value is None):
        raise ValueError(f"UnionFFNConfig: {name} must be one of 1, 2, 4, 8, 16, got {value!r}")
    for name in ("num_stages", "down_num_stages"):
      value = getattr(self, name)
      if value is None and name.startswith("down"):
        continue
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"UnionFFNConfig: {name} must be an int >= 1, got {value!r}")


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


def _matmul(a, b, use_dot):
  """a [rows, K] @ b [K, N] -> float32 [rows, N]. tl.dot (rows >= 16) or, for fewer rows, a
  broadcast multiply and a sum over K in float32 on the CUDA cores (2-D for one row)."""
  if use_dot:
    return plgpu.dot(a.astype(b.dtype), b)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  if a.shape[0] == 1:
    return jnp.sum(jnp.squeeze(a, 0)[:, None] * b, axis=0)[None, :]
  return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _up_kernel(*refs, has_index, rows, width, d_model, block_k, block_w, slots, use_dot):
  if has_index:
    x_ref, a_ref, idx_ref, w_ref, *rest = refs
  else:
    (x_ref, a_ref, w_ref, *rest), idx_ref = refs, None
  h_ref = rest[-1]                   # (with poisoned outputs, the aliased input comes first)
  chunk, slot = pl.program_id(0), pl.program_id(1)
  count, expert_of = _union(a_ref, idx_ref)

  def one_expert(i, carry):
    e = expert_of(slot + i * slots)
    cols = pl.ds(e * width + chunk * block_w, block_w)       # same columns in w_up and h

    def step(kb, acc):
      ks = pl.ds(kb * block_k, block_k)
      return acc + _matmul(x_ref[:, ks], w_ref[ks, cols], use_dot)

    acc = lax.fori_loop(0, d_model // block_k, step, jnp.zeros((rows, block_w), jnp.float32))
    a = a_ref[:, pl.ds(e, 1)].astype(jnp.float32)           # [rows, 1]
    h_ref[:, cols] = jnp.where(a != 0, jax.nn.silu(acc) * a, 0.0).astype(h_ref.dtype)
    return carry

  # slot < slots and count >= 0, so the numerator is >= 0 and lax.div is a floor division.
  lax.fori_loop(0, lax.div(count - slot + (slots - 1), slots), one_expert, 0)


def _down_kernel(*refs, has_index, rows, width, block_d, block_h, groups, unroll, use_dot):
  if has_index:
    h_ref, a_ref, idx_ref, w_ref, *rest = refs
  else:
    (h_ref, a_ref, w_ref, *rest), idx_ref = refs, None
  out_ref = rest[-1]
  column_block, group = pl.program_id(0), pl.program_id(1)
  count, expert_of = _union(a_ref, idx_ref)
  cols = pl.ds(column_block * block_d, block_d)
  positions = lax.div(count - group + (groups - 1), groups)   # this group's union positions

  def step(i, acc):
    # `unroll` experts per iteration: their tile loads are independent, so they are in flight
    # together whether or not Triton software-pipelines this loop.
    for j in range(unroll):
      p = i * unroll + j
      # Past this group's last position: reload the union's last expert (a cache hit) and drop
      # its contribution, rather than branch.
      e = expert_of(jnp.minimum(group + p * groups, count - 1))
      for c in range(width // block_h):
        hs = pl.ds(e * width + c * block_h, block_h)         # rows of w_down, columns of h
        h = h_ref[:, hs]
        if unroll > 1:
          h = jnp.where(p < positions, h, jnp.zeros_like(h))
        acc = acc + _matmul(h, w_ref[hs, cols], use_dot)
    return acc

  acc = lax.fori_loop(0, lax.div(positions + (unroll - 1), unroll), step,
                      jnp.zeros((rows, block_d), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _full(shape):
  """BlockSpec of a whole array (kernels index it themselves with pl.ds)."""
  return pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("width", "config", "interpret", "poison"))
def union_ffn_kernels(x, a, index, w_up2, w_down2, *, width: int, config: UnionFFNConfig,
                      interpret: bool = False, poison: bool = False):
  """The two kernels on prepared inputs.

  x [rows, d] (rows from kernel_rows), a [rows, E'] float router weights (E' >= E; a power of
  two with index="kernel"), index int32 [L] from reference.union_index (index="xla"; ignored
  otherwise, pass None), w_up2 [d, E * width] and w_down2 [E * width, d] (the contract's
  w_up [d, E, width] and w_down [E, width, d] reshaped, which is free). d and width must be
  multiples of 16. Returns y [rows, d] in x.dtype (down_groups == 1) or float32 partials
  [down_groups, rows, d]. poison=True runs on NaN-filled h and output buffers (tests: a tile the
  kernels leave unwritten, or an h column the down kernel reads but the up kernel did not write,
  shows up as NaN).
  """
  rows, d_model = x.shape
  num_experts = w_up2.shape[1] // width
  use_dot = rows >= MIN_DOT_ROWS
  block_w = _fit(config.block_w, width)
  block_d = _fit(config.block_d, d_model)
  block_k = _fit(config.block_k, d_model)
  block_h = _fit(config.block_h, width)
  if use_dot:                     # x tile [rows, block_k] (shared memory, per pipeline stage)
    block_k = max(16, min(block_k, MAX_X_TILE // rows))
  elif rows > 1:                  # the [rows, K, N] product lives in registers
    block_k = max(16, min(block_k, MAX_PRODUCT // (rows * block_w)))
    block_h = max(16, min(block_h, MAX_PRODUCT // (rows * block_d)))
  slots = min(config.expert_slots or num_experts, num_experts)
  groups = config.down_groups
  has_index = config.index == "xla"
  up_params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
  down_params = plgpu.CompilerParams(num_warps=config.down_num_warps or config.num_warps,
                                     num_stages=config.down_num_stages or config.num_stages)
  index_in = [index] if has_index else []

  h_shape = jax.ShapeDtypeStruct((rows, num_experts * width), w_down2.dtype)
  up_inputs = [x, a, *index_in, w_up2]
  up_aliases = {}
  if poison:
    up_inputs.append(jnp.full(h_shape.shape, jnp.nan, h_shape.dtype))
    up_aliases = {len(up_inputs) - 1: 0}
  h = pl.pallas_call(
      functools.partial(_up_kernel, has_index=has_index, rows=rows, width=width,
                        d_model=d_model, block_k=block_k, block_w=block_w, slots=slots,
                        use_dot=use_dot),
      grid=(width // block_w, slots),
      in_specs=[_full(v.shape) for v in up_inputs],
      out_specs=_full(h_shape.shape),
      out_shape=h_shape,
      input_output_aliases=up_aliases,
      compiler_params=up_params,
      interpret=interpret,
      name="union_ffn_up",
  )(*up_inputs)

  if groups == 1:
    out_shape = jax.ShapeDtypeStruct((rows, d_model), x.dtype)
    out_spec = pl.BlockSpec((rows, block_d), lambda j, g: (0, j))
  else:
    out_shape = jax.ShapeDtypeStruct((groups, rows, d_model), jnp.float32)
    out_spec = pl.BlockSpec((None, rows, block_d), lambda j, g: (g, 0, j))
  down_inputs = [h, a, *index_in, w_down2]
  down_specs = [_full(v.shape) for v in down_inputs]
  down_aliases = {}
  if poison:
    down_inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
    down_specs.append(out_spec)
    down_aliases = {len(down_inputs) - 1: 0}
  return pl.pallas_call(
      functools.partial(_down_kernel, has_index=has_index, rows=rows, width=width,
                        block_d=block_d, block_h=block_h, groups=groups,
                        unroll=config.down_unroll, use_dot=use_dot),
      grid=(d_model // block_d, groups),
      in_specs=down_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      input_output_aliases=down_aliases,
      compiler_params=down_params,
      interpret=interpret,
      name="union_ffn_down",
  )(*down_inputs)
