"""Tests of sparsejax.data: tokenizers, corpus splits and the grain pipeline."""

import json
import os

import numpy as np
import pytest

from sparsejax.data import (
    BATCH_KEYS,
    BPETokenizer,
    ByteTokenizer,
    DataConfig,
    build_tokenizer,
    load_token_file,
    load_tokenizer,
    make_eval_batches,
    make_tokenizer,
    make_train_iterator,
    resolve_corpus,
    split_files,
    stdlib_files,
)

TEXTS = [
    "hello world",
    "héllo wörld — ünïcödé ✓ 日本語のテキスト 🙂",
    "def f(x):\n    return x + 1\r\n\ttabs\x00nul",
    "text with <eos> and <bos> literally inside",
    "",
]


# ---------------------------------------------------------------------------
# Helpers.


def _write_corpus(directory, docs, suffix=".txt"):
  os.makedirs(directory, exist_ok=True)
  for i, text in enumerate(docs):
    with open(
        os.path.join(directory, f"doc_{i:04d}{suffix}"), "w", encoding="utf-8"
    ) as f:
      f.write(text)
  return os.path.join(str(directory), "**", f"*{suffix}")


def _segments(batch):
  """Yields (row, segment_id, token ids of the piece) for every segment."""
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      piece = np.concatenate(
          [batch["inputs"][r, idx], batch["targets"][r, idx[-1:]]]
      )
      yield r, int(s), piece


def _check_batch(batch, config, tokenizer):
  assert set(batch) == set(BATCH_KEYS)
  for key in BATCH_KEYS:
    assert batch[key].shape == (config.batch_size, config.seq_len), key
    assert batch[key].dtype == np.int32, key
  inputs, targets = batch["inputs"], batch["targets"]
  seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
  assert inputs.min() >= 0 and inputs.max() < tokenizer.vocab_size
  assert targets.min() >= 0 and targets.max() < tokenizer.vocab_size
  for r in range(config.batch_size):
    row = seg[r]
    real = row > 0
    n = int(real.sum())
    # Padding only at the end of the row.
    assert real[:n].all() and not real[n:].any()
    # Segment ids: contiguous runs starting at 1, increasing by exactly 1.
    if n:
      assert row[0] == 1
      steps = np.diff(row[:n])
      assert set(np.unique(steps).tolist()) <= {0, 1}
      assert row[:n].max() <= config.max_segments_per_row
    # Positions restart at 0 for every segment; padding is inert.
    starts = np.ones((n,), dtype=bool)
    starts[1:] = row[1:n] != row[: n - 1]
    expected = np.arange(n) - np.maximum.accumulate(
        np.where(starts, np.arange(n), 0)
    )
    np.testing.assert_array_equal(pos[r, :n], expected)
    assert (pos[r, n:] == 0).all()
    np.testing.assert_array_equal(mask[r], real.astype(np.int32))
    assert (inputs[r, n:] == tokenizer.pad_id).all()
    assert (targets[r, n:] == tokenizer.pad_id).all()
    # The target is the next input within a segment.
    same = (row[1:n] == row[: n - 1]) & (mask[r, : n - 1] == 1)
    np.testing.assert_array_equal(
        targets[r, : n - 1][same], inputs[r, 1:n][same]
    )
    # Specials: bos only as an input at a segment start, eos only as target.
    assert not (targets[r, :n] == tokenizer.bos_id).any()
    assert not (inputs[r, :n] == tokenizer.eos_id).any()
    bos = inputs[r, :n] == tokenizer.bos_id
    assert (pos[r, :n][bos] == 0).all()


def _pieces(batches):
  """Token ids ([bos]... piece ...[eos]) of every segment of the batches."""
  return [piece for b in batches for _, _, piece in _segments(b)]


# ---------------------------------------------------------------------------
# Tokenizers.


def test_byte_tokenizer_round_trip(tmp_path):
  tok = ByteTokenizer()
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (
      256,
      257,
      258,
      259,
  )
  for text in TEXTS:
    ids = tok.encode(text)
    assert isinstance(ids, list)
    assert all(0 <= i < 256 for i in ids)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, 999]) == text
    np.testing.assert_array_equal(tok.encode_array(text), ids)
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (259,) and lengths.dtype == np.int32
  assert lengths[:256].tolist() == [1] * 256 and lengths[256:].tolist() == [0] * 3
  # Invalid UTF-8 decodes with replacement characters.
  assert tok.decode([0xFF, ord("a")]) == "\ufffda"
  tok.save(tmp_path / "tok")
  assert os.path.isfile(tmp_path / "tok" / "tokenizer.json")
  loaded = load_tokenizer(tmp_path / "tok")
  assert isinstance(loaded, ByteTokenizer)


def test_bpe_train_save_load_round_trip(tmp_path):
  corpus = [t for t in TEXTS if t] * 20 + ["import os\nimport sys\n"] * 20
  tok = make_tokenizer("bpe", texts=corpus, vocab_size=300)
  assert isinstance(tok, BPETokenizer)
  assert tok.vocab_size <= 300
  specials = {tok.bos_id, tok.eos_id, tok.pad_id}
  assert len(specials) == 3 and max(specials) < tok.vocab_size
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (tok.vocab_size,) and lengths.dtype == np.int32
  assert all(lengths[i] == 0 for i in specials)
  probe = TEXTS + ["  leading   spaces\n\n", "unseen ✗ ǅ 𝔘𝔫𝔦 text"]
  for text in probe:
    ids = tok.encode(text)
    assert not specials & set(ids)  # "<eos>" in the text is plain text.
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
  assert len(tok.encode("import os\nimport sys\n")) < len("import os\nimport sys\n")
  tok.save(tmp_path / "bpe")
  loaded = load_tokenizer(tmp_path / "bpe")
  assert isinstance(loaded, BPETokenizer)
  assert loaded.vocab_size == tok.vocab_size
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
      tok.bos_id,
      tok.eos_id,
      tok.pad_id,
  )
  for text in probe:
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
  np.testing.assert_array_equal(loaded.token_byte_lengths(), lengths)


def test_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="kind") as e:
    make_tokenizer("wordpiece")
  assert "byte" in str(e.value) and "bpe" in str(e.value)
  with pytest.raises(FileNotFoundError, match="nothere"):
    load_tokenizer(tmp_path / "nothere")
  with pytest.raises(ValueError, match="tokenizer"):
    DataConfig(tokenizer="wordpiece")


# ---------------------------------------------------------------------------
# Corpus.


def test_stdlib_split_deterministic_disjoint_covering():
  files = stdlib_files()
  assert len(files) > 100
  assert files == sorted(files) == stdlib_files()
  assert all(f.endswith(".py") for f in files)
  assert not any(f"{os.sep}site-packages{os.sep}" in f for f in files)
  train = split_files(files, "train", 0.02)
  val = split_files(files, "validation", 0.02)
  assert train == split_files(files, "train", 0.02)
  assert val == split_files(list(reversed(files)), "validation", 0.02)[::-1]
  assert not set(train) & set(val)
  assert sorted(train + val) == files
  assert 0 < len(val) < 0.1 * len(files)
  # The assignment of a file does not depend on the other files.
  assert split_files(files[::2], "validation", 0.02) == [
      f for f in val if f in set(files[::2])
  ]
  assert resolve_corpus("stdlib", "validation")
  with pytest.raises(ValueError, match="split"):
    split_files(files, "test", 0.02)


def test_glob_corpus_and_errors(tmp_path):
  pattern = _write_corpus(tmp_path / "c", [f"doc {i}" for i in range(30)])
  train = resolve_corpus(pattern, "train", 0.2)
  val = resolve_corpus(pattern, "validation", 0.2)
  assert len(train) + len(val) == 30 and not set(train) & set(val) and val
  # Same split when the corpus is moved elsewhere (relative paths hashed).
  pattern2 = _write_corpus(tmp_path / "elsewhere" / "c", [f"doc {i}" for i in range(30)])
  val2 = resolve_corpus(pattern2, "validation", 0.2)
  assert [os.path.basename(p) for p in val2] == [os.path.basename(p) for p in val]

  missing = str(tmp_path / "nope" / "*.txt")
  with pytest.raises(FileNotFoundError, match="nope"):
    resolve_corpus(missing, "train")
  with pytest.raises(FileNotFoundError, match="nope"):
    make_train_iterator(DataConfig(source=missing), ByteTokenizer())
  with pytest.raises(ValueError, match="empty corpus") as e:
    resolve_corpus(pattern, "validation", 0.0)
  assert "validation" in str(e.value) and pattern in str(e.value)
  with pytest.raises(ValueError, match="empty corpus"):
    make_eval_batches(
        DataConfig(source=pattern, validation_fraction=0.0),
        ByteTokenizer(),
        1,
    )


def test_config_validation():
  for field, value in [
      ("seq_len", 0),
      ("batch_size", -1),
      ("validation_fraction", 1.0),
      ("token_dtype", "int8"),
      ("max_segments_per_row", 0),
      ("seed", -1),
      ("bpe_vocab_size", 10),
      ("source", ""),
  ]:
    with pytest.raises(ValueError, match=field):
      DataConfig(**{field: value})


def test_token_file_loading_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.bin"):
    load_token_file(str(tmp_path / "missing.bin"), "uint16")
  path = tmp_path / "t.bin"
  np.arange(10, dtype=np.uint16).tofile(path)
  with pytest.raises(ValueError, match="dtype"):
    load_token_file(str(path), "float32")
  np.testing.assert_array_equal(load_token_file(str(path), "uint16"), np.arange(10))


# ---------------------------------------------------------------------------
# Pipeline.


def test_stdlib_batches_are_well_formed():
  config = DataConfig(seq_len=128, batch_size=4, max_segments_per_row=4)
  tok = build_tokenizer(config)
  it = make_train_iterator(config, tok)
  for _ in range(20):
    _check_batch(next(it), config, tok)
  it.close()
  evals = make_eval_batches(config, tok, 3)
  assert len(evals) == 3
  for b in evals:
    _check_batch(b, config, tok)
  again = make_eval_batches(config, tok, 3)
  for a, b in zip(evals, again):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_max_segments_per_row(tmp_path):
  docs = [f"d{i}" for i in range(200)]
  pattern = _write_corpus(tmp_path / "small", docs)
  config = DataConfig(
      source=pattern,
      seq_len=64,
      batch_size=4,
      max_segments_per_row=3,
      validation_fraction=0.0,
  )
  tok = ByteTokenizer()
  it = make_train_iterator(config, tok)
  batches = [next(it) for _ in range(10)]
  it.close()
  for b in batches:
    _check_batch(b, config, tok)
  counts = [b["segment_ids"].max(axis=1) for b in batches]
  assert max(int(c.max()) for c in counts) == 3
  # Tiny documents are each a whole piece: [bos] + text + [eos].
  texts = {
      tok.decode(p) for p in _pieces(batches)
  }
  assert texts <= set(docs)


def test_long_document_split_without_lost_targets(tmp_path):
  rng = np.random.default_rng(0)
  long_text = "".join(
      rng.choice(list("abcdefghijklmnopqrstuvwxyzé\n ")) for _ in range(1000)
  )
  short = ["short one", "another short document"]
  pattern = _write_corpus(tmp_path / "long", [long_text] + short)
  config = DataConfig(
      source=pattern,
      seq_len=64,
      batch_size=4,
      validation_fraction=0.0,
  )
  tok = ByteTokenizer()
  doc = np.array(
      [tok.bos_id] + tok.encode(long_text) + [tok.eos_id], dtype=np.int32
  )
  n = len(doc)
  L = config.seq_len
  starts = list(range(0, n - 1, L))
  expected = [doc[s : s + L + 1] for s in starts]
  assert sum(len(p) - 1 for p in expected) == n - 1  # Every target once.

  it = make_train_iterator(config, tok)
  batches = [next(it) for _ in range(100)]
  it.close()
  pieces = _pieces(batches)
  for b in batches[:10]:
    _check_batch(b, config, tok)
  found = set()
  for piece in pieces:
    assert len(piece) <= L + 1
    for k, exp in enumerate(expected):
      if len(exp) == len(piece) and np.array_equal(exp, piece):
        found.add(k)
  assert found == set(range(len(expected)))
  # The short documents come through whole.
  decoded = {tok.decode(p) for p in pieces if len(p) < 40}
  assert set(short) <= decoded


def test_exact_resume_via_json_state():
  config = DataConfig(seq_len=64, batch_size=4, max_segments_per_row=4, seed=3)
  tok = ByteTokenizer()
  it = make_train_iterator(config, tok)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  it.close()
  resumed = make_train_iterator(config, tok)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(3)]
  resumed.close()
  for a, b in zip(expected, got):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  # Same seed -> same stream; other seed -> other stream.
  first = next(make_train_iterator(config, tok))
  other = next(
      make_train_iterator(
          DataConfig(seq_len=64, batch_size=4, max_segments_per_row=4, seed=4),
          tok,
      )
  )
  again = make_train_iterator(config, tok)
  np.testing.assert_array_equal(next(again)["inputs"], first["inputs"])
  assert not np.array_equal(first["inputs"], other["inputs"])


def test_exact_resume_across_windows_and_epochs(tmp_path, monkeypatch):
  from sparsejax.data import pipeline

  # Small shuffle windows so that the states below fall in many windows.
  monkeypatch.setattr(pipeline, "_WINDOW_TOKENS", 32 * 20)
  monkeypatch.setattr(pipeline, "_MIN_WINDOW_PIECES", 4)
  rng = np.random.default_rng(1)
  docs = [
      "".join(rng.choice(list("abc é\n"), size=int(rng.integers(1, 200))))
      for _ in range(12)
  ]
  pattern = _write_corpus(tmp_path / "resume", docs)
  config = DataConfig(
      source=pattern,
      seq_len=32,
      batch_size=2,
      validation_fraction=0.0,
      max_segments_per_row=2,
  )
  tok = ByteTokenizer()
  it = make_train_iterator(config, tok, shard_index=1, shard_count=2)
  reference = [next(it) for _ in range(120)]
  it.close()
  for k in (0, 1, 7, 31, 64, 100):
    it = make_train_iterator(config, tok, shard_index=1, shard_count=2)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = make_train_iterator(config, tok, shard_index=1, shard_count=2)
    resumed.set_state(state)
    for expected in reference[k : k + 10]:
      got = next(resumed)
      for key in BATCH_KEYS:
        np.testing.assert_array_equal(got[key], expected[key])
    resumed.close()


def test_shards_are_disjoint(tmp_path):
  docs = [f"document number {i:03d}" for i in range(40)]
  pattern = _write_corpus(tmp_path / "shards", docs)
  config = DataConfig(
      source=pattern, seq_len=64, batch_size=4, validation_fraction=0.0
  )
  tok = ByteTokenizer()
  seen = []
  for shard in range(2):
    it = make_train_iterator(config, tok, shard_index=shard, shard_count=2)
    batches = [next(it) for _ in range(20)]
    it.close()
    seen.append({tok.decode(p) for p in _pieces(batches)})
  assert seen[0] and seen[1]
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(docs)
  b0 = next(make_train_iterator(DataConfig(), tok, shard_index=0, shard_count=2))
  b1 = next(make_train_iterator(DataConfig(), tok, shard_index=1, shard_count=2))
  assert not np.array_equal(b0["inputs"], b1["inputs"])
  with pytest.raises(ValueError, match="shard_index"):
    make_train_iterator(DataConfig(), tok, shard_index=2, shard_count=2)


def test_token_files(tmp_path):
  tok = ByteTokenizer()
  docs = [f"token file doc {i} ✓" for i in range(12)]
  ids = []
  for d in docs[:6]:
    ids += tok.encode(d) + [tok.eos_id]
  path_a = tmp_path / "tokens" / "a.bin"
  os.makedirs(path_a.parent)
  np.array(ids, dtype=np.uint16).tofile(path_a)
  ids = []
  for d in docs[6:]:  # Leading bos is tolerated, no trailing eos needed.
    ids += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
  np.array(ids[:-1], dtype=np.uint16).tofile(tmp_path / "tokens" / "b.bin")

  config = DataConfig(
      token_files=str(tmp_path / "tokens" / "*.bin"),
      seq_len=64,
      batch_size=4,
      validation_fraction=0.0,
  )
  it = make_train_iterator(config, tok)
  batches = [next(it) for _ in range(6)]
  it.close()
  for b in batches:
    _check_batch(b, config, tok)
  pieces = _pieces(batches)
  for p in pieces:
    assert p[0] == tok.bos_id and p[-1] == tok.eos_id
  assert {tok.decode(p) for p in pieces} == set(docs)

  split_cfg = DataConfig(
      token_files=config.token_files,
      seq_len=64,
      batch_size=2,
      validation_fraction=0.3,
  )
  val = {tok.decode(p) for p in _pieces(make_eval_batches(split_cfg, tok, 4))}
  it = make_train_iterator(split_cfg, tok)
  train = {tok.decode(p) for p in _pieces([next(it) for _ in range(12)])}
  it.close()
  assert val and train and not val & train
  assert val | train == set(docs)

  with pytest.raises(FileNotFoundError, match="nothing_here"):
    make_train_iterator(
        DataConfig(token_files=str(tmp_path / "nothing_here" / "*.bin")), tok
    )


def test_bpe_pipeline(tmp_path):
  docs = [f"def function_{i}(x):\n    return x * {i}\n" for i in range(60)]
  pattern = _write_corpus(tmp_path / "py", docs, suffix=".py")
  config = DataConfig(
      source=pattern,
      tokenizer="bpe",
      bpe_vocab_size=300,
      seq_len=32,
      batch_size=2,
      validation_fraction=0.1,
  )
  tok = build_tokenizer(config)
  assert isinstance(tok, BPETokenizer)
  it = make_train_iterator(config, tok)
  batches = [next(it) for _ in range(5)]
  it.close()
  for b in batches:
    _check_batch(b, config, tok)
  evals = make_eval_batches(config, tok, 2)
  for b in evals:
    _check_batch(b, config, tok)
