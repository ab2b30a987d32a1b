"""Tokenizers: a byte-level tokenizer and a trainable byte-level BPE.

Both tokenizers expose the same small interface:

* ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` (ints)
* ``encode(text) -> list[int]`` (no special tokens added)
* ``encode_array(text) -> np.ndarray[int32]`` (same ids, as an array)
* ``decode(ids) -> str`` (special ids and ids outside the vocabulary skipped)
* ``token_byte_lengths() -> np.ndarray[int32]`` of shape ``[vocab_size]``:
  the number of UTF-8 bytes each id stands for (0 for special tokens); used to
  turn a per-token loss into bits per byte.
* ``save(directory)`` writes ``directory/tokenizer.json``;
  ``load_tokenizer(directory)`` reads it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Union

import numpy as np

TOKENIZER_FILENAME = "tokenizer.json"

# Marker key written into the tokenizer.json of a ByteTokenizer (an HF
# tokenizers file never has it).
_BYTE_FORMAT_KEY = "sparsejax_tokenizer"
_BYTE_FORMAT_VALUE = "byte"

BPE_SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
# 256 byte-level alphabet symbols + the 3 special tokens.
MIN_BPE_VOCAB_SIZE = 256 + len(BPE_SPECIAL_TOKENS)

TOKENIZER_KINDS = ("byte", "bpe")


def _as_id_array(ids) -> np.ndarray:
  arr = np.asarray(ids)
  if arr.ndim != 1:
    arr = arr.reshape(-1)
  if arr.size == 0:
    return np.zeros((0,), dtype=np.int64)
  return arr.astype(np.int64, copy=False)


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus ``bos=256``, ``eos=257``, ``pad=258``."""

  kind = "byte"
  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """Vectorised encode: int32 array of the UTF-8 bytes of ``text``."""
    data = text.encode("utf-8", errors="surrogatepass")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    arr = _as_id_array(ids)
    arr = arr[(arr >= 0) & (arr < 256)]
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.zeros((self.vocab_size,), dtype=np.int32)
    lengths[:256] = 1
    return lengths

  def save(self, directory) -> str:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_FILENAME)
    payload = {
        _BYTE_FORMAT_KEY: _BYTE_FORMAT_VALUE,
        "vocab_size": self.vocab_size,
        "bos_id": self.bos_id,
        "eos_id": self.eos_id,
        "pad_id": self.pad_id,
    }
    with open(path, "w", encoding="utf-8") as f:
      json.dump(payload, f, indent=2)
    return path

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259)"


class BPETokenizer:
  """Byte-level BPE backed by HuggingFace ``tokenizers``.

  No normalizer, a ByteLevel pre-tokenizer (no prefix space) and a ByteLevel
  decoder, so ``decode(encode(text)) == text`` for any string. Special tokens
  ``<bos>``, ``<eos>``, ``<pad>`` are never produced by ``encode`` (their text
  is encoded as ordinary bytes).
  """

  kind = "bpe"

  def __init__(self, hf_tokenizer):
    self._tok = hf_tokenizer
    # Text that happens to contain "<eos>" must not become the special id.
    self._tok.encode_special_tokens = True
    ids = [self._tok.token_to_id(t) for t in BPE_SPECIAL_TOKENS]
    if any(i is None for i in ids):
      raise ValueError(
          "BPE tokenizer is missing special tokens; expected"
          f" {BPE_SPECIAL_TOKENS}"
      )
    self.bos_id, self.eos_id, self.pad_id = (int(i) for i in ids)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self._special_ids = np.array(sorted(ids), dtype=np.int64)
    self._byte_lengths = None

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
      raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_BPE_VOCAB_SIZE:
      raise ValueError(
          f"vocab_size must be >= {MIN_BPE_VOCAB_SIZE} (256 bytes + 3 special"
          f" tokens), got {vocab_size}"
      )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=True
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if isinstance(texts, str):
      texts = [texts]
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(tok)

  @classmethod
  def from_file(cls, path) -> "BPETokenizer":
    from tokenizers import Tokenizer

    return cls(Tokenizer.from_file(os.fspath(path)))

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(
        self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32
    )

  def decode(self, ids) -> str:
    arr = _as_id_array(ids)
    keep = (arr >= 0) & (arr < self.vocab_size)
    keep &= ~np.isin(arr, self._special_ids)
    return self._tok.decode(arr[keep].tolist(), skip_special_tokens=True)

  def token_byte_lengths(self) -> np.ndarray:
    if self._byte_lengths is None:
      lengths = np.zeros((self.vocab_size,), dtype=np.int32)
      special = set(self._special_ids.tolist())
      for i in range(self.vocab_size):
        if i in special:
          continue
        token = self._tok.id_to_token(i)
        if token is None:
          continue
        # Byte-level BPE: each character of a token string is one byte.
        lengths[i] = len(token)
      self._byte_lengths = lengths
    return self._byte_lengths.copy()

  def save(self, directory) -> str:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_FILENAME)
    self._tok.save(path)
    return path

  def __repr__(self) -> str:
    return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = Union[ByteTokenizer, BPETokenizer]


def load_tokenizer(directory) -> Tokenizer:
  """Loads the tokenizer that ``save(directory)`` wrote."""
  directory = os.fspath(directory)
  path = os.path.join(directory, TOKENIZER_FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  with open(path, encoding="utf-8") as f:
    payload = json.load(f)
  if isinstance(payload, dict) and _BYTE_FORMAT_KEY in payload:
    if payload[_BYTE_FORMAT_KEY] != _BYTE_FORMAT_VALUE:
      raise ValueError(
          f"unknown tokenizer kind {payload[_BYTE_FORMAT_KEY]!r} in {path}"
      )
    return ByteTokenizer()
  return BPETokenizer.from_file(path)


def make_tokenizer(
    kind: str,
    texts: Iterable[str] | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
  """``"byte"`` -> ByteTokenizer; ``"bpe"`` -> BPETokenizer trained on texts."""
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    if texts is None:
      raise ValueError("make_tokenizer(kind='bpe') needs `texts` to train on")
    if vocab_size is None:
      raise ValueError("make_tokenizer(kind='bpe') needs `vocab_size`")
    return BPETokenizer.train(texts, vocab_size)
  raise ValueError(
      f"unknown tokenizer kind={kind!r}; allowed values: {TOKENIZER_KINDS}"
  )


__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "MIN_BPE_VOCAB_SIZE",
    "TOKENIZER_FILENAME",
    "TOKENIZER_KINDS",
    "Tokenizer",
    "load_tokenizer",
    "make_tokenizer",
]
