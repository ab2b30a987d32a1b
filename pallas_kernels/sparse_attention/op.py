"""The public op: per-token block-sparse causal attention with an implementation switch.

  sparse_attention(q, k, v, block_idx, block_valid, block_size=64, segment_ids=None,
                   key_bias=None, implementation="pallas" | "interpret" | "reference")

q [b, t, heads, d]; k, v [b, t, kv_heads, d] (self-attention over a row; heads % kv_heads == 0);
block_idx / block_valid [b, t, kv_heads, topk]: the key blocks (of `block_size` tokens) each query
token may see, per KV head. Query t sees key s when s's block is one of its valid selected blocks,
s <= t, and both carry the same segment id. Returns (out [b, t, heads, d] in q.dtype,
lse [b, t, heads] float32, natural log). Lengths need not be multiples of the block: the op pads.

key_bias: None or float [b, t, kv_heads], a per-key additive logit bias (NOSA's eviction scores):
query head n at token t weighs key s by exp(q.k / sqrt(d) + key_bias[b, s, n // group]), natural
log, the returned lse included. The Triton kernels take it, and the Mosaic forward with
launch.forward_kernel="mosaic" (checked in interpret mode and lowered for CUDA on the CPU, not yet
timed on a GPU); the Mosaic dK/dV kernel does not yet. So with a bias "auto" picks Triton for
both; without one no kernel gets a bias input.

Differentiable (jax.custom_vjp): the "pallas" and "interpret" implementations run the dq and dk/dv
kernels of backward.py, the "reference" one the jnp reference's VJP. With a key_bias the VJP
returns its cotangent too (float32, from the dk/dv kernel's dS).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention.backward import sparse_attention_backward
from pallas_kernels.sparse_attention.forward import sparse_attention_forward
from pallas_kernels.sparse_attention import backward_mosaic, forward_mosaic
from pallas_kernels.sparse_attention.index import block_index, next_power_of_2, union_token_bits
from pallas_kernels.sparse_attention.reference import sparse_attention_reference
from sparsejax.ops.infllmv2 import check_key_bias

IMPLEMENTATIONS = ("pallas", "interpret", "reference")


class Launch(NamedTuple):
  """How the kernels run: the Triton launch parameters, (num_warps, num_stages), of the three
  kernels, and the dk/dv kernel's work items (`dkdv_chunk`: at most that many query tiles per
  program; `index.KeyBlockIndex`). None of them changes the arithmetic, only its schedule (and
  with dkdv_chunk the order dK and dV's partial sums are added in).

  The launch defaults are the fastest of `experiments.bench_attention --tune` on the H100 (64k
  tokens, 32 heads over 2 KV heads, head dim 128: experiments/results/bench_attention_tuned.*).
  The forward gains 7% from a third stage; 8 warps cost every kernel 16-150% (again with the
  work items: dq +46%, dk/dv +39%). dkdv_chunk: at 64k forward + backward took 93.0 / 91.3 /
  91.1 ms at 256 / 1024 / 4096 tiles against 118.2 ms with one program per key block (the
  schedule it replaced, whose init-block program looped over every tile); 1024 splits 128k's
  block 0 into 32 programs rather than 8 (experiments/results/kernel_dkdv_run.md)."""
  forward: tuple[int, int] = (4, 3)
  dq: tuple[int, int] = (4, 2)
  dkdv: tuple[int, int] = (4, 2)
  dkdv_chunk: int = 1024
  # dQ from the dk/dv kernel with fp32 atomics instead of the dq kernel (`backward.py`): fewer
  # matmuls, the last bits of dQ nondeterministic. Not yet timed on a GPU, so off by default.
  dq_atomic: bool = False
  # The forward kernel: "triton" (any shape) or "mosaic", the Hopper kernel of forward_mosaic.py
  # (TMA, wgmma, warp-specialised; hp in {1, 8, 16, ...}, bf16/f16; packed documents as runs of
  # equal segment ids: a row whose ids come back after another id gets NaN). "auto" takes the
  # Mosaic kernel where it applies (a Hopper GPU, implementation="pallas", its shapes, one
  # document per row), the Triton one elsewhere: on the H100 it is 0.70x of Triton's time for
  # the attention alone at 128k (experiments/results/mosaic_forward.md).
  # `forward` above is the Triton kernel's launch; "mosaic" takes `mosaic_stages` K/V slots.
  forward_kernel: str = "auto"
  mosaic_stages: int = 4
  # The dK/dV partial sums: "triton", or "mosaic", the Hopper kernel of backward_mosaic.py
  # (hp >= 2 with tiles of 64 / hp tokens, block_size 64, bf16/f16, one document per row, no
  # dq_atomic), with `mosaic_dkdv_stages` Q/dO slots (even). "auto" takes the Mosaic kernel
  # where it applies, as forward_kernel does: on the H100 at 32k it took forward + backward
  # from 35.66 to 32.62 ms (experiments/results/mosaic_dkdv.md; 128k not yet timed).
  dkdv_kernel: str = "auto"
  mosaic_dkdv_stages: int = 4

  KERNELS = ("forward", "dq", "dkdv")
  FORWARD_KERNELS = ("auto", "triton", "mosaic")

  def check(self):
    for name in self.KERNELS:
      pair = getattr(self, name)
      if (not isinstance(pair, tuple) or len(pair) != 2
          or not all(isinstance(x, int) and x >= 1 for x in pair) or pair[0] & (pair[0] - 1)):
        raise ValueError(f"sparse_attention: launch.{name} must be (num_warps, num_stages) with "
                         f"num_warps a power of two and num_stages >= 1, got {pair!r}")
    for name, least, what in (("dkdv_chunk", 1, "query tiles per dk/dv program"),
                              ("mosaic_stages", 2, "K/V shared-memory slots")):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"sparse_attention: launch.{name} must be an int >= {least} ({what}), "
                         f"got {value!r}")
    for name in ("forward_kernel", "dkdv_kernel"):
      if getattr(self, name) not in self.FORWARD_KERNELS:
        raise ValueError(f"sparse_attention: launch.{name} must be one of "
                         f"{self.FORWARD_KERNELS}, got {getattr(self, name)!r}")
    stages = self.mosaic_dkdv_stages
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 2 or stages % 2:
      raise ValueError(f"sparse_attention: launch.mosaic_dkdv_stages must be an even int >= 2 "
                       f"(Q/dO slots, taken in turn by two warpgroups), got {stages!r}")
    if self.dq_atomic and self.dkdv_kernel == "mosaic":
      raise ValueError("sparse_attention: launch.dq_atomic needs dkdv_kernel='triton' (the "
                       "Mosaic dK/dV kernel adds no dQ)")
    if not isinstance(self.dq_atomic, bool):
      raise ValueError(f"sparse_attention: launch.dq_atomic must be a bool, got "
                       f"{self.dq_atomic!r}")


def _passes(check_shapes, *args) -> bool:
  """Whether a Mosaic kernel's `check_shapes` accepts args (for "auto")."""
  try:
    check_shapes(*args)
  except ValueError:
    return False
  return True


def _on_hopper() -> bool:
  device = jax.devices()[0]
  return (device.platform == "gpu"
          and str(getattr(device, "compute_capability", "")).startswith("9"))


def resolve_forward_kernel(launch: Launch, q, k, hp: int, block_size: int, *,
                           implementation: str, packed: bool, poison: bool,
                           biased: bool = False) -> str:
  """launch.forward_kernel, with "auto" made "mosaic" where that kernel applies (a Hopper GPU,
  implementation="pallas", its shapes, one document per row, no key bias) and "triton"
  elsewhere."""
  if launch.forward_kernel != "auto":
    return launch.forward_kernel
  mosaic = (_on_hopper() and implementation == "pallas" and not packed and not poison
            and not biased
            and _passes(forward_mosaic.check_shapes, q, k, hp, block_size))
  return "mosaic" if mosaic else "triton"


def resolve_dkdv_kernel(launch: Launch, q, k, hp: int, block_size: int, block_q: int, *,
                        implementation: str, packed: bool, biased: bool = False) -> str:
  """launch.dkdv_kernel, with "auto" made "mosaic" where backward_mosaic.py applies (a Hopper
  GPU, implementation="pallas", its shapes, tiles of 64 rows, one document per row, no
  dq_atomic, no key bias) and "triton" elsewhere."""
  if launch.dkdv_kernel != "auto":
    return launch.dkdv_kernel
  mosaic = (_on_hopper() and implementation == "pallas" and not packed and not launch.dq_atomic
            and not biased
            and block_q * hp == backward_mosaic.ROWS
            and _passes(backward_mosaic.check_shapes, q, k, hp, block_size))
  return "mosaic" if mosaic else "triton"


def _check(q, k, v, block_idx, block_valid, segment_ids, key_bias, block_size,
           implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"sparse_attention: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"sparse_attention: q, k, v must be [batch, seq, heads, head_dim] with k and v "
                     f"alike; got q{q.shape} k{k.shape} v{v.shape}")
  if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
    raise ValueError(f"sparse_attention: self-attention needs k{k.shape} to match q{q.shape} in "
                     "batch, seq and head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"sparse_attention: num_heads={q.shape[2]} must be a multiple of "
                     f"num_kv_heads={k.shape[2]}")
  want = (*q.shape[:2], k.shape[2])
  if block_idx.ndim != 4 or block_idx.shape[:3] != want or block_valid.shape != block_idx.shape:
    raise ValueError(f"sparse_attention: block_idx and block_valid must be [batch, seq, kv_heads, "
                     f"topk] = {want + ('topk',)}; got {block_idx.shape} and {block_valid.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"sparse_attention: segment_ids must be {q.shape[:2]}, got {segment_ids.shape}")
  check_key_bias("sparse_attention", key_bias, k, "seq")
  if block_size < 16 or block_size & (block_size - 1):
    raise ValueError(f"sparse_attention: block_size must be a power of two >= 16, got {block_size}")


def sparse_attention(q, k, v, block_idx, block_valid, *, block_size: int = 64,
                     segment_ids=None, key_bias=None, implementation: str = "pallas",
                     block_q: int | None = None, heads_per_program: int = 1,
                     poison_outputs: bool = False, launch: Launch = Launch()):
  """See the module docstring. block_q: query tokens per forward program (default block_size,
  or 64 / heads_per_program); heads_per_program: query heads of one KV head per forward program,
  a power of two dividing num_heads / num_kv_heads (their (token, head) pairs are the tile rows,
  so a program's union spans fewer tokens); the backward kernels use the same tiles.
  poison_outputs: run the kernel on NaN-filled output buffers (a test of full coverage).
  launch: the kernels' Triton launch parameters and the dk/dv work items (`Launch`).
  key_bias: None or float [batch, seq, kv_heads], added to the scaled logits (module docstring)."""
  _check(q, k, v, block_idx, block_valid, segment_ids, key_bias, block_size, implementation)
  if not isinstance(launch, Launch):
    raise ValueError(f"sparse_attention: launch must be a Launch, got {type(launch).__name__}")
  launch.check()
  group = q.shape[2] // k.shape[2]
  hp = heads_per_program
  if not isinstance(hp, int) or hp < 1 or hp & (hp - 1) or group % hp:
    raise ValueError(f"sparse_attention: heads_per_program must be a power of two dividing "
                     f"num_heads / num_kv_heads = {group}, got {heads_per_program!r}")
  packed = segment_ids is not None
  biased = key_bias is not None
  if biased and launch.dkdv_kernel == "mosaic":
    raise ValueError("sparse_attention: launch.dkdv_kernel='mosaic' takes no key_bias yet (the "
                     "Mosaic dK/dV kernel has no bias input); use 'triton' or 'auto'")
  launch = launch._replace(forward_kernel=resolve_forward_kernel(
      launch, q, k, hp, block_size, implementation=implementation, packed=packed,
      poison=poison_outputs, biased=biased))
  if launch.forward_kernel == "mosaic":
    forward_mosaic.check_shapes(q, k, hp, block_size)
    if poison_outputs:
      raise ValueError("sparse_attention: poison_outputs is a test of the Triton forward; "
                       "launch.forward_kernel='mosaic' writes fresh buffers")
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  if block_q is None:
    block_q = block_size if hp == 1 else max(1, 64 // hp)
  if (not isinstance(block_q, int) or isinstance(block_q, bool) or block_q < 1
      or block_q & (block_q - 1)):
    raise ValueError(f"sparse_attention: block_q must be a power of two >= 1, got {block_q!r}")
  if implementation == "pallas" and block_q * hp < 16:
    raise ValueError(f"sparse_attention: a tile's rows, block_q x heads_per_program = "
                     f"{block_q} x {hp}, must be >= 16 (Triton's smallest dot)")
  launch = launch._replace(dkdv_kernel=resolve_dkdv_kernel(
      launch, q, k, hp, block_size, block_q, implementation=implementation, packed=packed,
      biased=biased))
  if launch.dkdv_kernel == "mosaic":
    backward_mosaic.check_shapes(q, k, hp, block_size)
    if packed:
      raise ValueError("sparse_attention: launch.dkdv_kernel='mosaic' takes one document per "
                       "row; packed documents (segment_ids) need 'triton'")
    if block_q * hp != backward_mosaic.ROWS:
      raise ValueError(f"sparse_attention: launch.dkdv_kernel='mosaic' needs tiles of "
                       f"{backward_mosaic.ROWS} rows, block_q x heads_per_program = {block_q} x "
                       f"{hp}")
  if biased:
    key_bias = key_bias.astype(jnp.float32)
  return _sparse_attention(q, k, v, block_idx, block_valid.astype(bool),
                           segment_ids.astype(jnp.int32), key_bias,
                           (block_size, block_q, implementation, poison_outputs, hp, launch,
                            packed))


# key_bias may be None (an empty pytree): its cotangent is then None too, and no kernel sees it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _sparse_attention(q, k, v, block_idx, block_valid, segment_ids, key_bias, static):
  return _fwd_rule(q, k, v, block_idx, block_valid, segment_ids, key_bias, static)[0]


def _padded_inputs(q, k, v, block_idx, block_valid, segment_ids, block_size, block_q,
                   dkdv_chunk, tile=1, token_bits=False):
  """Pads the sequence to whole tiles (of at least `tile` tokens) and builds the kernels' index
  at block_q tokens (see index.py): the unions of the forward and dq tiles, and the dk/dv
  kernel's transposed index."""
  seq = q.shape[1]
  tile = max(block_q, block_size, tile)
  padded = -(-seq // tile) * tile
  pad = padded - seq
  pad_tokens = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  # Padded queries and keys get segment ids that match nothing real (and not each other).
  q_seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  kv_seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-2)
  topk = block_idx.shape[-1]
  idx = jnp.where(block_valid, block_idx, -1).astype(jnp.int32)
  idx = jnp.pad(idx, ((0, 0), (0, pad), (0, 0), (0, next_power_of_2(topk) - topk)),
                constant_values=-1)
  unions, key_index = block_index(idx, idx >= 0, num_kv_blocks=padded // block_size,
                                  block_q=block_q, chunk=dkdv_chunk, token_bits=token_bits)
  return ((pad_tokens(q), pad_tokens(k), pad_tokens(v), idx, q_seg, kv_seg, unions), key_index)


def _fwd_rule(q, k, v, block_idx, block_valid, segment_ids, key_bias, static):
  block_size, block_q, implementation, poison, hp, launch, packed = static
  if implementation == "reference":
    out = sparse_attention_reference(q, k, v, block_idx, block_valid, segment_ids,
                                     block_size=block_size, key_bias=key_bias)
    return out, (q, k, v, block_idx, block_valid, segment_ids, key_bias)
  seq = q.shape[1]
  mosaic = launch.forward_kernel == "mosaic"
  inputs, key_index = _padded_inputs(q, k, v, block_idx, block_valid, segment_ids, block_size,
                                     block_q, launch.dkdv_chunk,
                                     forward_mosaic.tile_tokens(hp) if mosaic else 1,
                                     token_bits=launch.dkdv_kernel == "mosaic")
  interpret = implementation == "interpret"
  bias = None
  if key_bias is not None:  # [b, kv_heads, padded]: a key block's bias is one contiguous run
    padded = inputs[0].shape[1]
    bias = jnp.pad(jnp.transpose(key_bias, (0, 2, 1)), ((0, 0), (0, 0), (0, padded - seq)))
  if mosaic:
    q_pad, k_pad, v_pad, idx, q_seg = inputs[:5]
    unions, bits = union_token_bits(idx, idx >= 0, num_kv_blocks=k_pad.shape[1] // block_size,
                                    tile_tokens=forward_mosaic.tile_tokens(hp))
    starts = None
    if packed:
      starts, runs_ok = forward_mosaic.document_starts(q_seg)
      starts = forward_mosaic.row_starts(starts, hp)
    out, lse = forward_mosaic.sparse_attention_forward_mosaic(
        q_pad, k_pad, v_pad, unions, bits, starts, bias, block_k=block_size,
        heads_per_program=hp, stages=launch.mosaic_stages, interpret=interpret)
    if packed:  # a segment id that comes back after another: NaN, never a silently other mask
      out = jnp.where(runs_ok[:, None, None, None], out, jnp.nan).astype(out.dtype)
      lse = jnp.where(runs_ok[:, None, None], lse, jnp.nan)
  else:
    out, lse = sparse_attention_forward(*inputs, bias, block_q=block_q, block_k=block_size,
                                        poison=poison, interpret=interpret, heads_per_program=hp,
                                        num_warps=launch.forward[0], num_stages=launch.forward[1])
  result = (out[:, :seq], jnp.transpose(lse, (0, 2, 1))[:, :seq])
  return result, (inputs, bias, key_index, out, lse)


def _bwd_rule(static, residuals, cotangents):
  block_size, block_q, implementation, _, hp, launch, _ = static
  d_out, d_lse = cotangents
  if implementation == "reference":
    q, k, v, block_idx, block_valid, segment_ids, key_bias = residuals
    reference = lambda q, k, v, key_bias: sparse_attention_reference(
        q, k, v, block_idx, block_valid, segment_ids, block_size=block_size, key_bias=key_bias)
    _, vjp = jax.vjp(reference, q, k, v, key_bias)
    dq, dk, dv, d_bias = vjp(cotangents)
    return dq, dk, dv, None, None, None, d_bias
  inputs, bias, key_index, out, lse = residuals
  seq, padded = d_out.shape[1], out.shape[1]
  pad = ((0, 0), (0, padded - seq))
  d_out = jnp.pad(d_out, pad + ((0, 0), (0, 0)))
  d_lse = jnp.pad(jnp.transpose(d_lse, (0, 2, 1)), ((0, 0), (0, 0), (0, padded - seq)))
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32)) - d_lse
  grads = sparse_attention_backward(*inputs, key_index, lse, delta,
                                    d_out.astype(inputs[0].dtype), block_q=block_q,
                                    block_k=block_size, heads_per_program=hp,
                                    dq_launch=launch.dq, dkdv_launch=launch.dkdv,
                                    dq_atomic=launch.dq_atomic, dkdv_kernel=launch.dkdv_kernel,
                                    mosaic_stages=launch.mosaic_dkdv_stages,
                                    interpret=implementation == "interpret", key_bias=bias)
  dq, dk, dv = grads[:3]
  d_bias = None if bias is None else jnp.transpose(grads[3], (0, 2, 1))[:, :seq]
  return dq[:, :seq], dk[:, :seq], dv[:, :seq], None, None, None, d_bias


_sparse_attention.defvjp(_fwd_rule, _bwd_rule)
