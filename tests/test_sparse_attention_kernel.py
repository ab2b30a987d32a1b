"""The block-sparse attention kernels (Pallas, interpret mode on the CPU) against sparsejax's
InfLLM-V2 reference: several shapes, ragged lengths, GQA 1/2/16, batch 2, packed documents,
poisoned outputs, and the backward kernels' gradients, one head or several per program."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import Launch, query_block_unions, sparse_attention
from pallas_kernels.sparse_attention.index import block_index, max_items
from sparsejax.ops import infllmv2 as ref_ops
from sparsejax.ops.attention import dense_attention


def inputs(seed, batch, seq, heads, kv_heads, dim, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (batch, seq, heads, dim), dtype),
          jax.random.normal(keys[1], (batch, seq, kv_heads, dim), dtype),
          jax.random.normal(keys[2], (batch, seq, kv_heads, dim), dtype))


def selection(q, k, cfg, segment_ids):
  scores = ref_ops.block_scores(q, k, cfg, segment_ids=segment_ids)
  return ref_ops.select_blocks(scores, cfg, q_len=q.shape[1], kv_len=k.shape[1],
                               segment_ids=segment_ids)


def config(topk, block=16):
  return ref_ops.InfLLMv2Config(block_size=block, compress_window=8, compress_stride=4,
                                lse_window=16, lse_stride=8, init_blocks=1, local_blocks=1,
                                topk=topk, dense_len=0)


CASES = [  # batch, seq, heads, kv_heads, dim, topk, packed
    (2, 100, 4, 2, 16, 3, True),    # ragged: 100 = 6.25 blocks of 16
    (1, 128, 16, 1, 32, 4, False),  # GQA 16
    (2, 77, 2, 2, 16, 2, True),     # GQA 1, ragged
    (1, 160, 8, 4, 16, 5, True),
]


@pytest.mark.parametrize("batch,seq,heads,kv_heads,dim,topk,packed", CASES)
def test_interpret_matches_reference(batch, seq, heads, kv_heads, dim, topk, packed):
  q, k, v = inputs(seq + heads, batch, seq, heads, kv_heads, dim)
  rng = np.random.default_rng(seq)
  seg = None
  if packed:
    cut = int(rng.integers(seq // 4, 3 * seq // 4))
    seg = jnp.asarray(np.stack([np.r_[np.ones(cut), 2 * np.ones(seq - cut)]] * batch), jnp.int32)
  cfg = config(topk)
  idx, valid = selection(q, k, cfg, seg)
  want, want_lse = ref_ops.sparse_attention(q, k, v, idx, valid, cfg, segment_ids=seg,
                                            return_lse=True)
  got, got_lse = sparse_attention(q, k, v, idx, valid, block_size=16, segment_ids=seg,
                                  implementation="interpret", poison_outputs=True)
  assert np.isfinite(np.asarray(got)).all() and np.isfinite(np.asarray(got_lse)).all()
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_lse, want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("heads,kv_heads,hp,block_q", [
    (16, 1, 16, None), (8, 2, 2, None), (6, 2, 1, None),
    (16, 1, 16, 1),   # one token's 16 heads per tile (the CUDA kernel's layout): no union
    (16, 2, 8, 2)])
def test_heads_as_rows_matches_reference(heads, kv_heads, hp, block_q):
  """heads_per_program > 1: the (token, head) rows layout, ragged length, packed, with grads;
  block_q None is the op's default (64 / heads_per_program tokens)."""
  batch, seq = 2, 75
  q, k, v = inputs(heads, batch, seq, heads, kv_heads, 16)
  seg = jnp.asarray(np.stack([np.r_[np.ones(30), 2 * np.ones(seq - 30)]] * batch), jnp.int32)
  cfg = config(3)
  idx, valid = selection(q, k, cfg, seg)
  want, want_lse = ref_ops.sparse_attention(q, k, v, idx, valid, cfg, segment_ids=seg,
                                            return_lse=True)
  run = lambda q, k, v: sparse_attention(q, k, v, idx, valid, block_size=16, segment_ids=seg,
                                         implementation="interpret", heads_per_program=hp,
                                         block_q=block_q, poison_outputs=True)
  got, got_lse = run(q, k, v)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_lse, want_lse, rtol=2e-5, atol=2e-5)
  w = jax.random.normal(jax.random.key(1), q.shape)
  grads = jax.grad(lambda q, k, v: jnp.sum(run(q, k, v)[0] * w), (0, 1, 2))(q, k, v)
  ref = jax.grad(lambda q, k, v: jnp.sum(ref_ops.sparse_attention(
      q, k, v, idx, valid, cfg, segment_ids=seg) * w), (0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="heads_per_program"):
    sparse_attention(q, k, v, idx, valid, block_size=16, heads_per_program=3)


def test_every_block_selected_equals_dense():
  q, k, v = inputs(7, 2, 90, 4, 2, 16)
  n_blocks = 6
  idx = jnp.broadcast_to(jnp.arange(n_blocks), (2, 90, 2, n_blocks))
  got, _ = sparse_attention(q, k, v, idx, jnp.ones_like(idx, bool), block_size=16,
                            implementation="interpret")
  np.testing.assert_allclose(got, dense_attention(q, k, v, implementation="xla"), rtol=2e-5,
                             atol=2e-5)


def test_bf16_inputs():
  q, k, v = inputs(3, 1, 64, 4, 2, 16, jnp.bfloat16)
  cfg = config(2)
  idx, valid = selection(q, k, cfg, None)
  got, _ = sparse_attention(q, k, v, idx, valid, block_size=16, implementation="interpret")
  want = ref_ops.sparse_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                  v.astype(jnp.float32), idx, valid, cfg)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("batch,seq,heads,kv_heads,packed,hp,chunk,dq_atomic", [
    (1, 48, 4, 2, False, 1, 1024, False), (2, 70, 4, 4, True, 1, 1, False),
    (1, 64, 16, 1, True, 1, 2, False),
    (2, 75, 8, 2, True, 4, 3, False),     # heads_per_program = group: one head-chunk per KV head
    (2, 75, 16, 2, True, 2, 1024, False), # heads_per_program < group: dk/dv loop over 4 chunks
    (2, 100, 8, 2, True, 2, 1, False),
    (2, 75, 8, 2, True, 4, 3, True),      # dQ from the dk/dv kernel's atomics
    (2, 70, 16, 2, True, 2, 1, True)])
def test_gradients_match_reference(batch, seq, heads, kv_heads, packed, hp, chunk, dq_atomic):
  """The dq and dk/dv kernels (through the custom_vjp), including the lse output's cotangent;
  tokens 32-47 select nothing, so some rows see no key: a whole tile of them at 16-token tiles,
  beside rows that see keys at 32-token tiles (hp = 2). chunk: query tiles per dk/dv work item
  (1-3: a key block's partial sums come from several items; 1024: one item per key block).
  dq_atomic: no dq kernel, the dk/dv kernel adds dQ's parts with atomics."""
  q, k, v = inputs(seq, batch, seq, heads, kv_heads, 16)
  seg = None
  if packed:
    seg = jnp.asarray(np.stack([np.r_[np.ones(seq // 3), 2 * np.ones(seq - seq // 3)]] * batch),
                      jnp.int32)
  cfg = config(2)
  idx, valid = selection(q, k, cfg, seg)
  valid = valid.at[:, 32:48].set(False)
  w = jax.random.normal(jax.random.key(9), q.shape)
  w_lse = jax.random.normal(jax.random.key(10), q.shape[:3])

  def kernel_loss(q, k, v):
    # A launch other than the default travels through the custom_vjp's static arguments.
    out, lse = sparse_attention(q, k, v, idx, valid, block_size=16, segment_ids=seg,
                                implementation="interpret", heads_per_program=hp,
                                launch=Launch(forward=(8, 3), dq=(2, 1), dkdv=(8, 2),
                                              dkdv_chunk=chunk, dq_atomic=dq_atomic))
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)

  def ref_loss(q, k, v):
    out, lse = ref_ops.sparse_attention(q, k, v, idx, valid, cfg, segment_ids=seg,
                                        return_lse=True)
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)

  for got, want in zip(jax.grad(kernel_loss, (0, 1, 2))(q, k, v),
                       jax.grad(ref_loss, (0, 1, 2))(q, k, v)):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_query_block_unions():
  idx = jnp.array([[[[0, 2]], [[2, 1]], [[3, 3]], [[0, -1]]]])  # [1, 4 tokens, 1 head, 2]
  unions = query_block_unions(idx, idx >= 0, num_kv_blocks=4, block_q=2)
  np.testing.assert_array_equal(unions[0, 0, :, :4], [[3, 0, 1, 2], [2, 0, 3, 0]])


def test_rows_without_keys_beside_rows_with_keys():
  q, k, v = inputs(5, 1, 64, 4, 2, 16)
  cfg = config(2)
  idx, valid = selection(q, k, cfg, None)
  valid = valid.at[:, 32:48].set(False)          # half of a 32-token tile (hp = 2) sees nothing
  got, got_lse = sparse_attention(q, k, v, idx, valid, block_size=16, implementation="interpret",
                                  heads_per_program=2)
  want, want_lse = ref_ops.sparse_attention(q, k, v, idx, valid, cfg, return_lse=True)
  np.testing.assert_array_equal(got_lse[:, 32:48], want_lse[:, 32:48])   # -inf
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("block_q,chunk", [(1, 1), (2, 3), (4, 100)])
def test_block_index_transposes_the_unions(block_q, chunk):
  """The dk/dv kernel's index: per key block, the query tiles whose union holds it, ascending,
  in items of at most `chunk` tiles; the items past the last are dead."""
  rng = np.random.default_rng(block_q)
  idx = jnp.asarray(rng.integers(-1, 6, (2, 8, 3, 4)), jnp.int32)    # 6 key blocks, some unused
  idx = idx.at[:, :, 0, 0].set(0)                                      # block 0 in every union
  unions, index = block_index(idx, idx >= 0, num_kv_blocks=6, block_q=block_q, chunk=chunk)
  np.testing.assert_array_equal(unions, query_block_unions(idx, idx >= 0, num_kv_blocks=6,
                                                           block_q=block_q))
  unions, tiles = np.asarray(unions), np.asarray(index.tiles)
  items, block_items = np.asarray(index.items), np.asarray(index.block_items)
  assert items.shape[2] == max_items(8 // block_q, min(6, 4 * block_q), 6, chunk)
  for b in range(2):
    for h in range(3):
      live = 0
      for kb in range(6):
        want = [qb for qb in range(8 // block_q)
                if kb in unions[b, h, qb, 1:1 + unions[b, h, qb, 0]]]
        first, n = block_items[b, h, kb]
        assert first == live and n == -(-len(want) // chunk)
        got = []
        for key_block, start, count, _ in items[b, h, first:first + n]:
          assert key_block == kb and 1 <= count <= chunk
          got += list(tiles[b, h, start:start + count])
        assert got == want
        live += n
      dead = items[b, h, live:]
      assert np.all(dead[:, 0] == 6) and np.all(dead[:, 2] == 0)
  # With token_bits, the same index, and each entry's word says which of its tile's tokens
  # selected the entry's key block.
  unions_b, with_bits = block_index(idx, idx >= 0, num_kv_blocks=6, block_q=block_q,
                                    chunk=chunk, token_bits=True)
  np.testing.assert_array_equal(unions_b, unions)
  for got_part, want_part in zip(with_bits[:3], index[:3]):
    np.testing.assert_array_equal(got_part, want_part)
  sel, bits = np.asarray(idx), np.asarray(with_bits.bits)
  for b, h in np.ndindex(2, 3):
    for key_block, start, count, _ in items[b, h]:
      for e in range(start, start + count):
        tile = tiles[b, h, e]
        want = sum(1 << i for i in range(block_q) if key_block in sel[b, tile * block_q + i, h])
        assert bits[b, h, e] == want, (b, h, e)


def test_bad_inputs_are_named():
  q, k, v = inputs(0, 1, 32, 4, 2, 16)
  idx = jnp.zeros((1, 32, 2, 2), jnp.int32)
  with pytest.raises(ValueError, match="implementation must be one of"):
    sparse_attention(q, k, v, idx, idx >= 0, implementation="cuda")
  with pytest.raises(ValueError, match="block_idx and block_valid must be"):
    sparse_attention(q, k, v, idx[:, :, :1], idx[:, :, :1] >= 0)
  with pytest.raises(ValueError, match="block_size must be a power of two"):
    sparse_attention(q, k, v, idx, idx >= 0, block_size=24)
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    sparse_attention(q, k, v, idx, idx >= 0, block_q=6)
  with pytest.raises(ValueError, match=r"block_q x heads_per_program = 4 x 2, must be >= 16"):
    sparse_attention(q, k, v, idx, idx >= 0, block_q=4, heads_per_program=2)
  with pytest.raises(ValueError, match="launch.dq must be"):
    sparse_attention(q, k, v, idx, idx >= 0, launch=Launch(dq=(3, 2)))
  with pytest.raises(ValueError, match="launch.dkdv_chunk must be an int >= 1"):
    sparse_attention(q, k, v, idx, idx >= 0, launch=Launch(dkdv_chunk=0))
  with pytest.raises(ValueError, match="launch.dq_atomic must be a bool"):
    sparse_attention(q, k, v, idx, idx >= 0, launch=Launch(dq_atomic=1))
  with pytest.raises(ValueError, match="launch must be a Launch"):
    sparse_attention(q, k, v, idx, idx >= 0, launch=(4, 2))


def test_bench_attention_option_parsing():
  """The benchmark's --launch and --tune_*_grid syntax (a subprocess: the binary defines flags)."""
  code = """if True:
    from experiments import bench_attention as b
    from pallas_kernels.sparse_attention import Launch
    assert b.parse_launch("forward=8x3,dkdv=4x1") == Launch(forward=(8, 3), dkdv=(4, 1))
    assert b.parse_launch("dkdv_chunk=64") == Launch(dkdv_chunk=64)
    assert b.parse_launch("dq_atomic=1") == Launch(dq_atomic=True)
    assert b.parse_launch("forward_kernel=mosaic,mosaic_stages=3") == Launch(
        forward_kernel="mosaic", mosaic_stages=3)
    assert b.parse_launch("dkdv_kernel=mosaic,mosaic_dkdv_stages=2") == Launch(
        dkdv_kernel="mosaic", mosaic_dkdv_stages=2)
    assert b.parse_grid("a=1|2,b=3") == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert b.parse_options("block_rows=64,num_warps=2") == {
        "block_rows": 64, "block_windows": 64, "num_warps": 2, "num_stages": 2}
    for bad in ("forward=8", "fwd=4x2", "dq=4xx2", "dkdv_chunk=4x2", "forward_kernel=cuda"):
      try:
        b.parse_launch(bad)
      except ValueError:
        continue
      raise AssertionError(bad)
    """
  subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_attention_writes_decode_rows(tmp_path):
  """bench_attention.json / .md with a decode row (decode_timing.attention_row's schema, in-step
  times as the row's own) beside a forward row, and the decode row's two profiles in
  _profile.md (a subprocess: the binary defines flags)."""
  out = str(tmp_path / "bench")
  code = f"""if True:
    import json
    from absl import flags
    from experiments import bench_attention as b, decode_timing
    flags.FLAGS(["bench", "--out={out}"])
    profile = {{"summary": {{"wall_us": 2.0, "kernel_us": 1.0, "idle_us": 0.5,
                             "busy_fraction": 0.5, "kernels_per_call": 1.0}},
                "kernels": [{{"name": "k", "us": 1.0, "count": 1.0, "share": 1.0,
                              "idle_us": 0.5}}]}}
    decode = {{"pass": "decode", "seq_len": 4096, "batch": 8, "config": "issue"}}
    decode.update(sparsejax_ms=0.2, cudnn_dense_ms=0.9,
                  step_sparsejax_ms=0.05, step_cudnn_dense_ms=0.4, floor_ms=0.02,
                  step_speedup_vs_cudnn_dense=8.0, speedup_vs_cudnn_dense=4.5,
                  selection_ms=0.1, attention_ms=0.1, profile=dict(sparse=profile, dense=profile))
    fwd = b.row(4096, "fwd", 2.0, 4.0, 1.0, 1e12, scores_ms=1.0, selection_ms=1.5,
                attention_given_selection_ms=0.5, mean_union_blocks=80.0, profile=profile)
    b.write_outputs([fwd, decode_timing.attention_row(decode)], [])
    rows = json.load(open("{out}.json"))["rows"]
    assert rows[1]["pass"] == "decode" and rows[1]["sparsejax_ms"] == 0.05
    assert rows[1]["cudnn_dense_ms"] == 0.4 and rows[1]["speedup_vs_cudnn_dense"] == 8.0
    assert rows[1]["call_sparsejax_ms"] == 0.2 and rows[1]["ratio_to_floor"] == 2.5
    md = open("{out}.md").read()
    assert "| 4096 | decode, batch 8, in-step | 0.0500 |" in md and "8.00x" in md
    assert "| 4096 | fwd | 2.00 |" in md
    prof = open("{out}_profile.md").read()
    assert "4096 tokens, decode, sparse" in prof and "4096 tokens, decode, dense" in prof
    """
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("block_q", [1, 3, 4])
def test_query_block_unions_match_sets(block_q):
  """Random selections with repeats, dead slots and out-of-range ids: each tile's union is the
  sorted set of its tokens' live ids."""
  rng = np.random.default_rng(block_q)
  idx = rng.integers(-2, 9, (2, 12, 3, 5))                     # 8 key blocks: 8 is out of range
  valid = rng.random(idx.shape) < 0.8
  unions = np.asarray(query_block_unions(jnp.asarray(idx, jnp.int32), jnp.asarray(valid),
                                         num_kv_blocks=8, block_q=block_q))
  for b in range(2):
    for h in range(3):
      for qb in range(12 // block_q):
        rows = slice(qb * block_q, (qb + 1) * block_q)
        live = valid[b, rows, h] & (idx[b, rows, h] >= 0) & (idx[b, rows, h] < 8)
        want = sorted(set(idx[b, rows, h][live].tolist()))
        n = unions[b, h, qb, 0]
        assert list(unions[b, h, qb, 1:1 + n]) == want
        assert not unions[b, h, qb, 1 + n:].any()


# A per-key additive logit bias (NOSA's eviction scores): key_bias [b, seq, kv_heads].

def random_selection(seed, batch, seq, kv_heads, topk, block):
  """Per token and KV head: its own block in slot 0, then random earlier blocks (repeats, an
  invalid slot and a -1 slot among them)."""
  rng = np.random.default_rng(seed)
  own = np.arange(seq) // block
  idx = (rng.random((batch, seq, kv_heads, topk)) * (own[None, :, None, None] + 1)).astype(np.int32)
  idx[..., 0] = own[None, :, None]
  idx[..., -1] = np.where(rng.random(idx.shape[:3]) < 0.2, -1, idx[..., -1])
  valid = np.ones(idx.shape, bool)
  valid[..., 1] = rng.random(idx.shape[:3]) < 0.8
  return jnp.asarray(idx), jnp.asarray(valid)


def two_documents(batch, seq, cut):
  return jnp.asarray(np.stack([np.r_[np.ones(cut), 2 * np.ones(seq - cut)]] * batch), jnp.int32)


def key_bias_of(seed, k):
  return 2.0 * jax.random.normal(jax.random.key(seed), k.shape[:3], jnp.float32)


def test_reference_key_bias_is_an_extra_key_dimension():
  """The jnp reference's key_bias, and its gradient, against the unbiased reference on one more
  head dimension: q' = [q sqrt((d+1)/d), 1], k' = [k, b sqrt(d+1)] give q'.k'/sqrt(d+1) =
  q.k/sqrt(d) + b (v' = [v, 0])."""
  batch, seq, heads, kv_heads, dim = 2, 45, 4, 2, 8
  q, k, v = inputs(11, batch, seq, heads, kv_heads, dim)
  bias = key_bias_of(12, k)
  idx, valid = random_selection(13, batch, seq, kv_heads, 3, 16)
  seg = two_documents(batch, seq, 20)
  w = jax.random.normal(jax.random.key(14), q.shape)
  from pallas_kernels.sparse_attention import sparse_attention_reference

  def biased(q, k, v, bias):
    out, lse = sparse_attention_reference(q, k, v, idx, valid, seg, block_size=16, key_bias=bias)
    return jnp.sum(out * w) + jnp.sum(lse)

  def extra_dimension(q, k, v, bias):
    grow = lambda x, col: jnp.concatenate([x, col[..., None]], axis=-1)
    out, lse = sparse_attention_reference(
        grow(q * np.sqrt((dim + 1) / dim), jnp.ones(q.shape[:3])),
        grow(k, bias * np.sqrt(dim + 1)), grow(v, jnp.zeros(v.shape[:3])), idx, valid, seg,
        block_size=16)
    return jnp.sum(out[..., :dim] * w) + jnp.sum(lse)

  got = jax.value_and_grad(biased, (0, 1, 2, 3))(q, k, v, bias)
  want = jax.value_and_grad(extra_dimension, (0, 1, 2, 3))(q, k, v, bias)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,seq,heads,kv_heads,dim,hp,packed", [
    (2, 100, 4, 2, 16, 1, True),     # ragged: 100 = 6.25 blocks of 16
    (1, 77, 2, 2, 16, 1, True),      # GQA 1, ragged
    (1, 128, 16, 1, 32, 16, False),  # GQA 16, one program per token's 16 heads
    (2, 75, 16, 2, 16, 4, True)])    # heads_per_program < group
def test_key_bias_forward_matches_reference(batch, seq, heads, kv_heads, dim, hp, packed):
  q, k, v = inputs(seq + heads, batch, seq, heads, kv_heads, dim)
  bias = key_bias_of(seq, k)
  idx, valid = random_selection(seq, batch, seq, kv_heads, 4, 16)
  seg = two_documents(batch, seq, seq // 3) if packed else None
  got, got_lse = sparse_attention(q, k, v, idx, valid, block_size=16, segment_ids=seg,
                                  key_bias=bias, implementation="interpret",
                                  heads_per_program=hp, poison_outputs=True)
  want, want_lse = sparse_attention(q, k, v, idx, valid, block_size=16, segment_ids=seg,
                                    key_bias=bias, implementation="reference")
  assert np.isfinite(np.asarray(got)).all() and np.isfinite(np.asarray(got_lse)).all()
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_lse, want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("batch,seq,heads,kv_heads,packed,hp,chunk,dq_atomic", [
    (2, 100, 8, 2, True, 2, 1, False),   # ragged; every key block's dS summed over items
    (1, 70, 4, 4, False, 1, 2, False),   # GQA 1
    (2, 75, 16, 2, True, 4, 3, True)])   # hp < group (4 head chunks), dQ by atomics
def test_key_bias_gradients_match_reference(batch, seq, heads, kv_heads, packed, hp, chunk,
                                            dq_atomic):
  """dq, dk, dv and d(key_bias) through the dq and dk/dv kernels, the lse cotangent included;
  tokens 32-47 select nothing (rows without keys). chunk: query tiles per dk/dv work item, so
  a key block's bias gradient comes from several items."""
  q, k, v = inputs(seq, batch, seq, heads, kv_heads, 16)
  bias = key_bias_of(seq + 1, k)
  idx, valid = random_selection(seq, batch, seq, kv_heads, 3, 16)
  valid = valid.at[:, 32:48].set(False)
  seg = two_documents(batch, seq, seq // 3) if packed else None
  w = jax.random.normal(jax.random.key(9), q.shape)
  w_lse = jax.random.normal(jax.random.key(10), q.shape[:3])

  def loss(implementation, q, k, v, bias):
    out, lse = sparse_attention(q, k, v, idx, valid, block_size=16, segment_ids=seg,
                                key_bias=bias, implementation=implementation,
                                heads_per_program=hp,
                                launch=Launch(dkdv_chunk=chunk, dq_atomic=dq_atomic))
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)

  got = jax.grad(lambda *a: loss("interpret", *a), (0, 1, 2, 3))(q, k, v, bias)
  want = jax.grad(lambda *a: loss("reference", *a), (0, 1, 2, 3))(q, k, v, bias)
  assert np.abs(np.asarray(want[3])).max() > 0.1
  for g, r in zip(got, want):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_zero_key_bias_is_the_unbiased_op_and_bad_key_bias_is_named():
  q, k, v = inputs(21, 1, 40, 4, 2, 16)
  idx, valid = random_selection(21, 1, 40, 2, 3, 16)
  w = jax.random.normal(jax.random.key(22), q.shape)

  def run(*bias):
    f = lambda q, k, v, *b: sparse_attention(q, k, v, idx, valid, block_size=16,
                                             key_bias=b[0] if b else None,
                                             implementation="interpret")
    outputs = f(q, k, v, *bias)
    grads = jax.grad(lambda *a: jnp.sum(f(*a)[0] * w), (0, 1, 2))(q, k, v, *bias)
    return (*outputs, *grads)

  for got, want in zip(run(jnp.zeros(k.shape[:3])), run()):
    np.testing.assert_array_equal(got, want)
  for bad in (jnp.zeros((1, 40, 4)), jnp.zeros((1, 40)), jnp.zeros((1, 40, 2), jnp.int32)):
    with pytest.raises(ValueError, match=r"key_bias must be .*\(1, 40, 2\)"):
      sparse_attention(q, k, v, idx, valid, block_size=16, key_bias=bad)
  with pytest.raises(ValueError, match="launch.dkdv_kernel='mosaic' takes no key_bias"):
    sparse_attention(q, k, v, idx, valid, block_size=16, key_bias=jnp.zeros(k.shape[:3]),
                     launch=Launch(dkdv_kernel="mosaic"))
