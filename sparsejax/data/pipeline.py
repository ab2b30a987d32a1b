"""grain input pipeline: documents -> pieces -> packed rows -> batches.

A batch is a dict of int32 numpy arrays, all ``[batch_size, seq_len]``:

* ``inputs``, ``targets``: token ids (``pad_id`` in padding),
* ``segment_ids``: 1, 2, 3, ... for the pieces of a row in order of
  appearance, 0 for padding (padding only at the end of a row),
* ``positions``: 0-based position of each token inside its piece (0 on
  padding),
* ``loss_mask``: 1 where ``targets`` is the real next token of the same
  document, else 0 (i.e. 0 exactly on padding).

Each document is tokenised as ``[bos] + tokens + [eos]``; a document longer
than ``seq_len + 1`` tokens is cut into pieces of at most ``seq_len + 1``
tokens, consecutive pieces overlapping by one token so that no target is lost;
for a piece ``inputs = piece[:-1]``, ``targets = piece[1:]``.

Training pipeline (every stage checkpointable; the state is plain JSON):

  MapDataset.range(inf) -> map(index -> document of this shard in the
  epoch's seeded permutation -> read + tokenise + cut into pieces)  [lazy]
  -> to_iter_dataset (2 reader threads) -> flat map to pieces
  -> window shuffle of pieces (mixes pieces of long documents with others)
  -> grain FirstFitPackIterDataset (<= ``max_segments_per_row`` pieces/row)
  -> batch(batch_size, drop_remainder=True).

Restoring a state re-reads at most one shuffle window plus one packing group,
(a fraction of a second for the stdlib).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import threading
from collections.abc import Sequence

import grain
import numpy as np

from sparsejax.data import corpus as corpus_lib
from sparsejax.data import tokenizers as tok_lib

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

# Text used to train a BPE tokenizer is capped to this many characters.
BPE_TRAIN_MAX_CHARS = 20_000_000
# Fixed seed used for evaluation batches (independent of DataConfig.seed so
# that runs with different seeds evaluate on the same batches).
EVAL_SEED = 1234
# Window shuffle of pieces: about this many tokens per window.
_WINDOW_TOKENS = 1 << 19
_MIN_WINDOW_PIECES = 64
_MAX_WINDOW_PIECES = 8192
# grain thread settings for reading / tokenising documents.
_READ_THREADS = 2
_READ_BUFFER = 16
_INFINITE = 1 << 62


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data comes from and how it is cut into batches."""

  source: str = "stdlib"
  token_files: str = ""
  token_dtype: str = "uint16"
  validation_fraction: float = 0.02
  seq_len: int = 256
  batch_size: int = 8
  seed: int = 0
  tokenizer: str = "byte"
  bpe_vocab_size: int = 4096
  max_segments_per_row: int = 64

  def __post_init__(self):
    if not isinstance(self.source, str) or not self.source:
      raise ValueError(
          f"source must be 'stdlib' or a non-empty glob, got {self.source!r}"
      )
    if not isinstance(self.token_files, str):
      raise ValueError(
          f"token_files must be a string (glob), got {self.token_files!r}"
      )
    if self.token_dtype not in corpus_lib.TOKEN_DTYPES:
      raise ValueError(
          f"token_dtype must be one of {corpus_lib.TOKEN_DTYPES}, got"
          f" {self.token_dtype!r}"
      )
    vf = self.validation_fraction
    if (
        isinstance(vf, bool)
        or not isinstance(vf, (int, float))
        or not 0.0 <= vf < 1.0
    ):
      raise ValueError(f"validation_fraction must be in [0, 1), got {vf!r}")
    for name, low in (
        ("seq_len", 1),
        ("batch_size", 1),
        ("max_segments_per_row", 1),
        ("bpe_vocab_size", tok_lib.MIN_BPE_VOCAB_SIZE),
    ):
      value = getattr(self, name)
      if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
    if self.tokenizer not in tok_lib.TOKENIZER_KINDS:
      raise ValueError(
          f"tokenizer must be one of {tok_lib.TOKENIZER_KINDS}, got"
          f" {self.tokenizer!r}"
      )

  @property
  def data_description(self) -> str:
    if self.token_files:
      return f"token_files={self.token_files!r}"
    return f"source={self.source!r}"


# ---------------------------------------------------------------------------
# Tokenizer.


def build_tokenizer(config: DataConfig):
  """``"byte"`` -> ByteTokenizer; ``"bpe"`` -> BPE trained on the train split.

  BPE training reads the train-split files of ``config.source`` in a
  deterministic (seeded) order up to ~``BPE_TRAIN_MAX_CHARS`` characters.
  """
  if config.tokenizer == "byte":
    return tok_lib.ByteTokenizer()
  if config.tokenizer == "bpe":
    if config.token_files:
      raise ValueError(
          "tokenizer='bpe' with token_files set: pre-tokenized files need the"
          " tokenizer that produced them; load it with"
          " sparsejax.data.load_tokenizer(directory) instead of training one"
      )
    files = corpus_lib.resolve_corpus(
        config.source, "train", config.validation_fraction
    )
    order = np.random.default_rng(config.seed).permutation(len(files))

    def texts():
      total = 0
      for i in order:
        text = corpus_lib.read_text(files[int(i)])
        if not text:
          continue
        if total + len(text) > BPE_TRAIN_MAX_CHARS:
          text = text[: BPE_TRAIN_MAX_CHARS - total]
        total += len(text)
        yield text
        if total >= BPE_TRAIN_MAX_CHARS:
          return

    return tok_lib.BPETokenizer.train(texts(), config.bpe_vocab_size)
  return tok_lib.make_tokenizer(config.tokenizer)  # Raises ValueError.


# ---------------------------------------------------------------------------
# Documents.


class _TextDocuments:
  """Random-access list of text files; an element is the file's token ids."""

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> int:
    return int(index)

  def tokens(self, index: int, tokenizer) -> np.ndarray:
    text = corpus_lib.read_text(self._paths[index])
    return np.asarray(tokenizer.encode_array(text), dtype=np.int32)


class _TokenDocuments:
  """Random-access documents of pre-tokenized files."""

  def __init__(self, arrays, file_ids, starts, ends, names):
    self._arrays = arrays
    self._file_ids = np.asarray(file_ids, dtype=np.int64)
    self._starts = np.asarray(starts, dtype=np.int64)
    self._ends = np.asarray(ends, dtype=np.int64)
    self._names = names

  def __len__(self) -> int:
    return int(self._starts.shape[0])

  def __getitem__(self, index: int) -> int:
    return int(index)

  def tokens(self, index: int, tokenizer) -> np.ndarray:
    f = int(self._file_ids[index])
    s, e = int(self._starts[index]), int(self._ends[index])
    toks = np.asarray(self._arrays[f][s:e]).astype(np.int32)
    if toks.size and int(toks.max()) >= tokenizer.vocab_size:
      raise ValueError(
          f"token file {self._names[f]} has id {int(toks.max())} >="
          f" tokenizer vocab_size {tokenizer.vocab_size}"
      )
    return toks


@functools.lru_cache(maxsize=64)
def _cached_document_bounds(path, size, mtime_ns, dtype, eos_id, bos_id):
  del size, mtime_ns  # Only part of the cache key.
  tokens = corpus_lib.load_token_file(path, dtype)
  return corpus_lib.token_file_documents(tokens, eos_id, bos_id)


def _token_documents(config: DataConfig, tokenizer, split: str):
  pattern = config.token_files
  files = corpus_lib.expand_glob(pattern)
  root = corpus_lib.glob_root(pattern)
  arrays, file_ids, starts, ends, hashes = [], [], [], [], []
  for f_index, path in enumerate(files):
    st = os.stat(path)
    s, e = _cached_document_bounds(
        path,
        st.st_size,
        st.st_mtime_ns,
        config.token_dtype,
        int(tokenizer.eos_id),
        int(tokenizer.bos_id),
    )
    arrays.append(corpus_lib.load_token_file(path, config.token_dtype))
    file_ids.append(np.full(s.shape, f_index, dtype=np.int64))
    starts.append(s)
    ends.append(e)
    key = corpus_lib.relative_key(path, root)
    hashes.append(corpus_lib.document_unit_hashes(key, int(s.shape[0])))
  file_ids = np.concatenate(file_ids)
  starts = np.concatenate(starts)
  ends = np.concatenate(ends)
  hashes = np.concatenate(hashes)
  vf = config.validation_fraction
  is_val = hashes < vf
  if vf > 0 and hashes.size >= 2 and not is_val.any():
    is_val[int(np.argmin(hashes))] = True
  keep = is_val if split == "validation" else ~is_val
  if not keep.any():
    raise ValueError(
        f"empty corpus: split={split!r} of token_files={pattern!r} has no"
        f" document ({hashes.size} documents before the split,"
        f" validation_fraction={vf})"
    )
  return _TokenDocuments(
      arrays, file_ids[keep], starts[keep], ends[keep], list(files)
  )


def _documents(config: DataConfig, tokenizer, split: str):
  if config.token_files:
    return _token_documents(config, tokenizer, split)
  paths = corpus_lib.resolve_corpus(
      config.source, split, config.validation_fraction
  )
  return _TextDocuments(paths)


def split_into_pieces(
    tokens: np.ndarray, bos_id: int, eos_id: int, seq_len: int
) -> list[dict[str, np.ndarray]]:
  """``[bos] + tokens + [eos]`` cut into pieces of <= seq_len + 1 tokens.

  Consecutive pieces overlap by one token. Returns per piece a dict with
  int32 ``inputs`` (piece[:-1]), ``targets`` (piece[1:]) and ``loss_mask``
  (ones).
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  doc = np.empty((tokens.shape[0] + 2,), dtype=np.int32)
  doc[0] = bos_id
  doc[1:-1] = tokens
  doc[-1] = eos_id
  n = doc.shape[0]
  pieces = []
  start = 0
  while True:
    piece = doc[start : start + seq_len + 1]
    length = piece.shape[0] - 1
    pieces.append({
        "inputs": piece[:-1],
        "targets": piece[1:],
        "loss_mask": np.ones((length,), dtype=np.int32),
    })
    if start + seq_len + 1 >= n:
      break
    start += seq_len
  return pieces


class _DocumentOrder:
  """Maps a global element index to a document index.

  Epoch ``e`` visits the documents of the shard (``shard_index::shard_count``)
  in the order of a numpy permutation seeded by ``(seed, shard_index, e)``.
  (grain's ``MapDataset.shuffle`` uses ``index_shuffle``, which costs
  milliseconds per element for small datasets, so we shuffle ourselves.)
  Thread-safe: grain calls it from its reader threads.
  """

  _CACHED_EPOCHS = 4

  def __init__(self, num_documents, *, seed, shard_index, shard_count):
    self._docs = np.arange(shard_index, num_documents, shard_count)
    self._seed = int(seed)
    self._shard_index = int(shard_index)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._docs.shape[0])

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        rng = np.random.default_rng([self._seed, self._shard_index, epoch])
        perm = self._docs[rng.permutation(self._docs.shape[0])]
        if len(self._perms) >= self._CACHED_EPOCHS:
          self._perms.pop(min(self._perms))
        self._perms[epoch] = perm
      return perm

  def __call__(self, index: int) -> int:
    epoch, i = divmod(int(index), self._docs.shape[0])
    return int(self._permutation(epoch)[i])


def _document_pieces(index, *, order, documents, tokenizer, seq_len):
  tokens = documents.tokens(order(index), tokenizer)
  if tokens.shape[0] == 0:
    return []
  return split_into_pieces(tokens, tokenizer.bos_id, tokenizer.eos_id, seq_len)


class _WindowShuffleIterDataset(grain.IterDataset):
  """Tumbling-window shuffle: read ``window_size`` elements, emit them in a
  seeded random order, repeat. Uses numpy permutations (grain's
  WindowShuffleIterDataset uses index_shuffle, slow for small windows)."""

  def __init__(self, parent, *, window_size: int, seed: int):
    super().__init__(parent)
    self._window_size = int(window_size)
    self._seed = int(seed)

  def __iter__(self):
    return _WindowShuffleIterator(
        self._parent.__iter__(), window_size=self._window_size, seed=self._seed
    )

  def __str__(self) -> str:
    return f"WindowShuffle(window_size={self._window_size})"


class _WindowShuffleIterator(grain.DatasetIterator):
  """State: parent state at the start of the current window, number of
  windows filled so far and position in the current window; restoring
  re-reads the current window from the parent."""

  def __init__(self, parent, *, window_size: int, seed: int):
    super().__init__(parent)
    self._window_size = window_size
    self._seed = seed
    self._window: list = []
    self._order = np.zeros((0,), dtype=np.int64)
    self._pos = 0
    self._windows_filled = 0
    self._window_start_state = self._parent.get_state()

  def _fill(self, window_number: int) -> None:
    window = []
    for _ in range(self._window_size):
      try:
        window.append(next(self._parent))
      except StopIteration:
        break
    self._window = window
    rng = np.random.default_rng([self._seed, window_number])
    self._order = rng.permutation(len(window))

  def __next__(self):
    if self._pos >= len(self._window):
      self._window_start_state = self._parent.get_state()
      self._fill(self._windows_filled)
      self._windows_filled += 1
      self._pos = 0
      if not self._window:
        raise StopIteration
    i = int(self._order[self._pos])
    element = self._window[i]
    self._window[i] = None  # Free memory early.
    self._pos += 1
    return element

  def get_state(self):
    return {
        "parent": copy.deepcopy(self._window_start_state),
        "windows_filled": self._windows_filled,
        "pos_in_window": self._pos,
    }

  def set_state(self, state):
    self._window_start_state = copy.deepcopy(state["parent"])
    self._parent.set_state(self._window_start_state)
    self._windows_filled = int(state["windows_filled"])
    self._pos = int(state["pos_in_window"])
    self._window, self._order = [], np.zeros((0,), dtype=np.int64)
    if self._windows_filled > 0:
      self._fill(self._windows_filled - 1)
      for k in range(min(self._pos, len(self._window))):
        self._window[int(self._order[k])] = None
    else:
      self._pos = 0

  def __str__(self) -> str:
    return f"WindowShuffleIterator(window_size={self._window_size})"


class _Flatten(grain.experimental.FlatMapTransform):
  max_fan_out = 1 << 30  # Only used by the MapDataset flavour.

  def flat_map(self, element):
    return element


def _to_batch_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
      "inputs": row["inputs"].astype(np.int32, copy=False),
      "targets": row["targets"].astype(np.int32, copy=False),
      "segment_ids": row["inputs_segment_ids"].astype(np.int32, copy=False),
      "positions": row["inputs_positions"].astype(np.int32, copy=False),
      "loss_mask": row["loss_mask"].astype(np.int32, copy=False),
  }


def _derived_seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _window_pieces(config: DataConfig) -> int:
  w = _WINDOW_TOKENS // config.seq_len
  w = max(w, _MIN_WINDOW_PIECES, 2 * config.batch_size)
  return min(w, _MAX_WINDOW_PIECES)


def _num_packing_bins(config: DataConfig) -> int:
  return max(config.batch_size, 16)


def _build_dataset(
    config: DataConfig,
    tokenizer,
    documents,
    *,
    train: bool,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
  order = _DocumentOrder(
      len(documents),
      seed=_derived_seed(seed, 1),
      shard_index=shard_index,
      shard_count=shard_count,
  )
  if len(order) == 0:
    raise ValueError(
        f"empty corpus: shard {shard_index} of {shard_count} of the"
        f" {'train' if train else 'validation'} split of"
        f" {config.data_description} has no document"
    )
  # Infinite stream of element indices; epochs repeat with a new order.
  ds = grain.MapDataset.range(_INFINITE).map(
      functools.partial(
          _document_pieces,
          order=order,
          documents=documents,
          tokenizer=tokenizer,
          seq_len=config.seq_len,
      )
  )
  it = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=_READ_THREADS, prefetch_buffer_size=_READ_BUFFER
      )
  )
  it = grain.experimental.FlatMapIterDataset(it, _Flatten())
  if train:
    it = _WindowShuffleIterDataset(
        it,
        window_size=_window_pieces(config),
        seed=_derived_seed(seed, 2, shard_index),
    )
  length = config.seq_len
  it = grain.experimental.FirstFitPackIterDataset(
      it,
      length_struct={"inputs": length, "targets": length, "loss_mask": length},
      num_packing_bins=_num_packing_bins(config),
      seed=_derived_seed(seed, 3, shard_index),
      shuffle_bins=train,
      padding_struct={
          "inputs": int(tokenizer.pad_id),
          "targets": int(tokenizer.pad_id),
          "loss_mask": 0,
      },
      max_sequences_per_bin=config.max_segments_per_row,
  )
  it = it.map(_to_batch_row)
  return it.batch(config.batch_size, drop_remainder=True)


def make_train_iterator(
    config: DataConfig, tokenizer, *, shard_index: int = 0, shard_count: int = 1
) -> grain.DatasetIterator:
  """Infinite iterator of training batches for one shard (process).

  Shards take disjoint documents (``documents[shard_index::shard_count]``).
  Deterministic given ``config.seed``; ``get_state()`` is JSON-serialisable
  and ``set_state()`` resumes exactly.
  """
  if not _is_int(shard_count) or shard_count < 1:
    raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
  if not _is_int(shard_index) or not 0 <= shard_index < shard_count:
    raise ValueError(
        f"shard_index must be in [0, {shard_count}), got {shard_index!r}"
    )
  documents = _documents(config, tokenizer, "train")
  ds = _build_dataset(
      config,
      tokenizer,
      documents,
      train=True,
      seed=config.seed,
      shard_index=int(shard_index),
      shard_count=int(shard_count),
  )
  return iter(ds)


def make_eval_batches(
    config: DataConfig, tokenizer, num_batches: int
) -> list[dict[str, np.ndarray]]:
  """``num_batches`` deterministic batches of the validation split.

  Documents are shuffled with the fixed ``EVAL_SEED`` (not ``config.seed``)
  and packed without row shuffling; if the split is too small it is cycled.
  Same result on every call and on every process.
  """
  if not _is_int(num_batches) or num_batches < 0:
    raise ValueError(f"num_batches must be an int >= 0, got {num_batches!r}")
  documents = _documents(config, tokenizer, "validation")
  if num_batches == 0:
    return []
  ds = _build_dataset(
      config, tokenizer, documents, train=False, seed=EVAL_SEED
  )
  iterator = iter(ds)
  try:
    batches = [next(iterator) for _ in range(num_batches)]
  finally:
    iterator.close()
  return batches


__all__ = [
    "BATCH_KEYS",
    "DataConfig",
    "build_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "split_into_pieces",
]
