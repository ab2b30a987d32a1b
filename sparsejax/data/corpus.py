"""Text corpora (the Python standard library or a glob of files) and
pre-tokenized token files."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "validation")
TOKEN_DTYPES = ("uint16", "uint32")

# Directories of the standard library that are not "library code".
_STDLIB_EXCLUDED_DIRS = frozenset({
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "__pycache__",
})

_GLOB_MAGIC = ("*", "?", "[")


def stdlib_root() -> str:
  return os.path.realpath(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
  """All ``*.py`` files of the running interpreter's standard library.

  ``site-packages`` and the ``test``/``tests``/``idlelib``/``lib2to3``
  directories are skipped. Sorted, deterministic.
  """
  root = stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(
        d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS
    )
    for name in filenames:
      if name.endswith(".py"):
        out.append(os.path.join(dirpath, name))
  out.sort()
  return out


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got split={split!r}")


def _check_fraction(validation_fraction: float) -> None:
  if isinstance(validation_fraction, bool) or not isinstance(
      validation_fraction, (int, float)
  ):
    raise ValueError(
        "validation_fraction must be a number in [0, 1), got"
        f" {validation_fraction!r}"
    )
  if not 0.0 <= float(validation_fraction) < 1.0:
    raise ValueError(
        "validation_fraction must be in [0, 1), got"
        f" validation_fraction={validation_fraction!r}"
    )


def glob_root(pattern: str) -> str:
  """The directory part of ``pattern`` before its first wildcard."""
  pattern = os.path.expanduser(pattern)
  parts = pattern.split(os.sep)
  static = []
  for part in parts:
    if any(m in part for m in _GLOB_MAGIC):
      break
    static.append(part)
  if len(static) == len(parts):  # No wildcard at all: a literal path.
    return os.path.dirname(os.path.abspath(pattern))
  root = os.sep.join(static)
  if not root:
    root = os.sep if pattern.startswith(os.sep) else "."
  return os.path.abspath(root)


def _default_root(paths: Sequence[str]) -> str:
  """Root used when the caller gives none: the stdlib if every path lies in
  it, else the common directory of the paths."""
  abspaths = [os.path.abspath(p) for p in paths]
  std = stdlib_root()
  real = [os.path.realpath(p) for p in abspaths]
  if all(r == std or r.startswith(std + os.sep) for r in real):
    return std
  return os.path.commonpath([os.path.dirname(p) for p in abspaths])


def relative_key(path: str, root: str) -> str:
  """``path`` relative to ``root`` with "/" separators (the split hash key)."""
  p = os.path.abspath(path)
  r = os.path.abspath(root)
  rel = os.path.relpath(p, r)
  if rel.startswith(".."):
    rp, rr = os.path.realpath(p), os.path.realpath(r)
    rel = os.path.relpath(rp, rr)
  return rel.replace(os.sep, "/")


def stable_unit_hash(key: str) -> float:
  """A machine-independent hash of ``key`` mapped to [0, 1)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(
    paths: Sequence[str],
    split: str,
    validation_fraction: float,
    *,
    root: str | None = None,
) -> list[str]:
  """Deterministic train/validation split of ``paths``.

  A file goes to "validation" when the stable hash (sha256) of its path
  relative to ``root`` (default: the stdlib directory when every path is in
  it, else the common directory of the paths) is below
  ``validation_fraction``. So the assignment of a file is the same on every
  machine and does not depend on the other files.

  One exception keeps small corpora usable: when ``validation_fraction > 0``,
  there are at least two files and the hash puts none of them in validation,
  the file with the smallest hash goes to validation.
  Output keeps the order of ``paths``.
  """
  _check_split(split)
  _check_fraction(validation_fraction)
  paths = list(paths)
  if not paths:
    return []
  if root is None:
    root = _default_root(paths)
  hashes = [stable_unit_hash(relative_key(p, root)) for p in paths]
  is_val = [h < validation_fraction for h in hashes]
  if validation_fraction > 0 and len(paths) >= 2 and not any(is_val):
    is_val[int(np.argmin(hashes))] = True
  want_val = split == "validation"
  return [p for p, v in zip(paths, is_val) if v == want_val]


def expand_glob(pattern: str) -> list[str]:
  """Sorted regular files matching ``pattern`` (``**`` recursive)."""
  if not isinstance(pattern, str) or not pattern:
    raise ValueError(f"expected a non-empty glob pattern, got {pattern!r}")
  expanded = os.path.expanduser(pattern)
  matches = sorted(
      {
          os.path.abspath(p)
          for p in glob.glob(expanded, recursive=True)
          if os.path.isfile(p)
      }
  )
  if not matches:
    raise FileNotFoundError(f"no file matches the data pattern: {pattern!r}")
  return matches


def resolve_corpus(
    source: str, split: str, validation_fraction: float = 0.02
) -> list[str]:
  """The files of ``split`` of a corpus.

  ``source == "stdlib"``: the standard library; otherwise a glob pattern
  (``**`` allowed). Zero-byte files are dropped.

  Raises:
    FileNotFoundError: no file matches ``source``.
    ValueError: the split is empty ("empty corpus").
  """
  _check_split(split)
  _check_fraction(validation_fraction)
  if source == "stdlib":
    files = stdlib_files()
    root = stdlib_root()
  else:
    files = expand_glob(source)
    root = glob_root(source)
  files = [f for f in files if os.path.getsize(f) > 0]
  chosen = split_files(files, split, validation_fraction, root=root)
  if not chosen:
    raise ValueError(
        f"empty corpus: split={split!r} of source={source!r} has no non-empty"
        f" file ({len(files)} non-empty files before the split,"
        f" validation_fraction={validation_fraction})"
    )
  return chosen


def read_text(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace", newline="") as f:
    return f.read()


def load_token_file(path: str, dtype: str) -> np.memmap:
  """Memory-maps a flat file of token ids (documents separated by eos)."""
  if dtype not in TOKEN_DTYPES:
    raise ValueError(
        f"token dtype must be one of {TOKEN_DTYPES}, got dtype={dtype!r}"
    )
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"token file not found: {path}")
  itemsize = np.dtype(dtype).itemsize
  size = os.path.getsize(path)
  if size % itemsize:
    raise ValueError(
        f"token file {path} has {size} bytes, not a multiple of the {dtype}"
        f" item size {itemsize}"
    )
  if size == 0:
    return np.zeros((0,), dtype=dtype)  # np.memmap cannot map empty files.
  return np.memmap(path, dtype=dtype, mode="r")


def token_file_documents(
    tokens: np.ndarray,
    eos_id: int,
    bos_id: int | None = None,
    *,
    chunk_size: int = 1 << 26,
) -> tuple[np.ndarray, np.ndarray]:
  """(starts, ends) of the non-empty documents of a flat token array.

  Documents are separated by ``eos_id``; a document's leading ``bos_id`` (if
  given and present) is excluded; tokens after the last eos form a document.
  The eos scan runs in chunks so huge memmaps are not loaded at once.
  """
  n = int(tokens.shape[0])
  found = []
  for lo in range(0, n, chunk_size):
    chunk = np.asarray(tokens[lo : lo + chunk_size])
    found.append(np.flatnonzero(chunk == eos_id).astype(np.int64) + lo)
  eos_pos = np.concatenate(found) if found else np.zeros((0,), np.int64)
  starts = np.concatenate([[0], eos_pos + 1]).astype(np.int64)
  ends = np.concatenate([eos_pos, [n]]).astype(np.int64)
  if bos_id is not None and n:
    nonempty = starts < ends
    first = np.full(starts.shape, -1, dtype=np.int64)
    first[nonempty] = np.asarray(tokens[starts[nonempty]], dtype=np.int64)
    starts = starts + (first == bos_id)
  keep = starts < ends
  return starts[keep], ends[keep]


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """Vectorised splitmix64 finaliser on uint64 (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def document_unit_hashes(file_key: str, num_documents: int) -> np.ndarray:
  """Machine-independent hashes in [0, 1) of documents 0..n-1 of a file
  (the file identified by ``file_key``, e.g. its path relative to the data
  root)."""
  digest = hashlib.sha256(file_key.encode("utf-8")).digest()
  base = np.uint64(int.from_bytes(digest[:8], "big") & _MASK64)
  idx = np.arange(num_documents, dtype=np.uint64)
  with np.errstate(over="ignore"):
    mixed = _splitmix64(base ^ _splitmix64(idx))
  return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


__all__ = [
    "SPLITS",
    "TOKEN_DTYPES",
    "expand_glob",
    "glob_root",
    "load_token_file",
    "read_text",
    "relative_key",
    "resolve_corpus",
    "split_files",
    "stable_unit_hash",
    "stdlib_files",
    "stdlib_root",
    "document_unit_hashes",
    "token_file_documents",
]
