"""Retrieval rows mixed into pretraining batches: long-context training data we can generate.

A byte-level model pretrained on source code has never seen "The pass key is 12345 ... What is
the pass key?", and at tens of millions of parameters it does not learn to answer it zero-shot:
the first long-context ablation scored 0 with every attention. The papers' models learn
retrieval from their long-context data (MiniCPM4's 5B-token long stage, Locret's LongAlign QA);
we have none to download, so a `fraction` of the rows of each training batch is replaced by a
RULER-style task (`sparsejax.eval.tasks`) filling the whole row, followed by its gold answer
and eos: [bos] prompt " a, b, c." [eos], padding after it. The LM loss covers the whole row.

What this means for evaluation: the model is trained on the task *formats* (as RULER-tuned
models are), so the harness then measures whether an attention lets the model retrieve at a
given length and depth, not whether retrieval emerges zero-shot. It never sees an evaluation
prompt: task seeds here start at 2^43 (the harness's are `seed * 1_000_003 + i`, Locret's
examples 2^40 and 2^41), and "corpus" haystacks read the corpus's TRAINING split, which the
harness's haystacks and the validation loss never read.

Rows replaced, and everything about each generated row, are a pure function of (seed, shard,
batch index, row), so the iterator's state is the wrapped pipeline's state plus a batch count
and a resumed run continues with exactly the rows it would have seen.
"""
from __future__ import annotations

import copy
import dataclasses

import ml_collections
import numpy as np

from sparsejax.config import comma_list
from sparsejax.eval.tasks import HAYSTACKS, TASKS, answer_text, make_sample

_TASK_SEED_BASE = 2 ** 43
_SALT = 0x3E7A1
# Tokens kept free after the prompt for the answer and eos. The longest answer of the needle
# tasks (multi_value / multi_query: four 7-digit numbers) is 37 bytes; variable_tracking's five
# names 35; word lists are longer, hence the check in `_sample`.
ANSWER_ROOM = 64
# A training-only row kind beside the harness's tasks: [bos] s s [eos], s random characters. The
# loss on the second copy is pure in-context copying, the induction-head skill every retrieval
# task rests on, with a dense signal (half the row) where a task row has a few answer tokens.
# Each sample draws s from a random subset of 2 to 40 characters: over a small alphabet the next
# character is only known after matching a long stretch of the first copy, the way "pass key is"
# must be told from the noise's "sky is" (a byte model must match 6 characters back).
COPY = "copy"
_COPY_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789 .,:", np.uint8)
_COPY_MIN_LEN = 16


def _names(value, name: str, allowed) -> tuple[str, ...]:
  items = comma_list(value, str, f"retrieval_mix.{name}")
  if not items or set(items) - set(allowed):
    raise ValueError(f"retrieval_mix.{name} must name some of {sorted(allowed)} (comma-"
                     f"separated), got {value!r}")
  return items


@dataclasses.dataclass(frozen=True)
class RetrievalMixConfig:
  """`fraction` of the rows of every batch are tasks drawn uniformly from `tasks` (the harness's
  tasks, and "copy": see COPY), on a haystack drawn from `haystacks`, needle depth uniform in
  [0, 1]. 0 turns the mix off. For the first `early_batches` batches `early_fraction` of the rows
  are tasks drawn from `early_tasks` (empty: `tasks`) instead."""
  fraction: float = 0.0
  tasks: tuple[str, ...] = ("passkey", "multi_key", "multi_value", "multi_query")
  haystacks: tuple[str, ...] = ("noise", "corpus")
  min_length: int = 0
  early_batches: int = 0
  early_fraction: float = 0.0
  early_tasks: tuple[str, ...] = ()

  # The early stage exists because in-context copying is a skill a small model either has or
  # does not, and it forms far sooner when most rows demand it: on the H100 (2026-12-06) the
  # long-context ablation's 26M byte-level model, 200 steps x 128 rows x 1024 tokens, answered
  # every passkey with one fixed number at fraction 0.5 over all four tasks, but with fraction
  # 0.9 over passkey and copy rows it emitted the needle's digits, mostly reordered ("29231" ->
  # "99231", "85549" -> "85499"): copying had started (experiments/results/longctx_copy_probe).

  # min_length: 0 = one sample filling each row. Otherwise each row packs samples (separate
  # documents, segment ids 1, 2, ...) of log-uniform lengths between the task's shortest and the
  # row, at least min_length: many more answers per row, most of them at short range, where a
  # small model learns to copy long before it can at 16k (the first try, one sample a row, taught
  # the formats but no retrieval: "The pass key is" got the same number for every prompt).

  def __post_init__(self):
    for name in ("fraction", "early_fraction"):
      f = getattr(self, name)
      if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
        raise ValueError(f"retrieval_mix.{name} must be a number in [0, 1], got {f!r}")
    for name in ("min_length", "early_batches"):
      m = getattr(self, name)
      if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"retrieval_mix.{name} must be an int >= 0, got {m!r}")
    object.__setattr__(self, "tasks", _names(self.tasks, "tasks", (*TASKS, COPY)))
    early = self.early_tasks or self.tasks
    object.__setattr__(self, "early_tasks", _names(early, "early_tasks", (*TASKS, COPY)))
    object.__setattr__(self, "haystacks", _names(self.haystacks, "haystacks", HAYSTACKS))

  @property
  def active(self) -> bool:
    """Whether any batch gets task rows."""
    return self.fraction > 0 or (self.early_batches > 0 and self.early_fraction > 0)

  def stage(self, batch_index: int) -> tuple[float, tuple[str, ...]]:
    """(fraction, tasks) of the batch_index-th batch (0-based)."""
    if batch_index < self.early_batches:
      return self.early_fraction, self.early_tasks
    return self.fraction, self.tasks

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | None) -> "RetrievalMixConfig":
    return cls(**dict(config)) if config is not None else cls()


class RetrievalMixIterator:
  """Wraps a training-batch iterator (`sparsejax.data.make_train_iterator`) and replaces rows of
  each batch by generated task rows. Same batch layout (module docstring of the pipeline)."""

  def __init__(self, parent, tokenizer, mix: RetrievalMixConfig, *, corpus: str, seed: int,
               shard_index: int = 0):
    self._parent = parent
    self._tokenizer = tokenizer
    self._mix = mix
    self._corpus = corpus
    self._seed = int(seed)
    self._shard = int(shard_index)
    self._batches = 0
    self._min_lens: dict[str, int] = {}
    # A BPE may merge across the pieces of a prompt and land a few tokens off its target.
    self._slack = 0 if getattr(tokenizer, "kind", None) == "byte" else 16

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    index, self._batches = self._batches, self._batches + 1
    rows = batch["inputs"].shape[0]
    fraction, tasks = self._mix.stage(index)
    rng = np.random.default_rng([self._seed, _SALT, self._shard, index])
    chosen = np.flatnonzero(rng.uniform(size=rows) < fraction)
    if not len(chosen):
      return batch
    batch = {k: np.array(v) for k, v in batch.items()}
    for r in chosen:
      row = self._row(index * rows + int(r), batch["inputs"].shape[1], tasks)
      for k, v in row.items():
        batch[k][r] = v
    return batch

  def _row(self, example: int, seq_len: int, tasks: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One row of packed task samples (segments 1, 2, ...), each [bos] prompt answer [eos];
    sample lengths log-uniform in [min_length, seq_len] (one sample when min_length is 0)."""
    tok, mix = self._tokenizer, self._mix
    rng = np.random.default_rng([self._seed, _SALT, self._shard, example, 1])
    row = {"inputs": np.full(seq_len, tok.pad_id, np.int32),
           "targets": np.full(seq_len, tok.pad_id, np.int32),
           "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.int32)}
    lo = min(mix.min_length or seq_len, seq_len)
    used, segment = 0, 0
    while seq_len - used >= lo:
      task = tasks[int(rng.integers(len(tasks)))]
      haystack = mix.haystacks[int(rng.integers(len(mix.haystacks)))]
      # (One sample a row fills it; a row too short for it gets make_sample's own error.)
      room = seq_len - used
      shortest = max(lo, self._min_len(task)) if mix.min_length else lo
      if shortest > room:
        if segment:
          break  # padding ends the row
        raise ValueError(f"retrieval_mix: a {task} sample needs at least {shortest} tokens, more "
                         f"than data.seq_len={seq_len}")
      # A sample of n positions holds n + 1 ids; a leftover too short for any task joins it.
      n = min(room, int(np.exp(rng.uniform(np.log(shortest), np.log(seq_len + 1)))))
      n = room if room - n < max(lo, min(map(self._min_len, tasks))) else n
      ids = self._sample(task, haystack, n, rng, example * 64 + segment)
      segment += 1
      span = slice(used, used + len(ids) - 1)
      row["inputs"][span], row["targets"][span] = ids[:-1], ids[1:]
      row["segment_ids"][span] = segment
      row["positions"][span] = np.arange(len(ids) - 1)
      row["loss_mask"][span] = 1
      used += len(ids) - 1  # the answer took less than ANSWER_ROOM: the next sample starts here
    return row

  def _sample(self, task, haystack, n, rng, index) -> list[int]:
    """[bos] prompt answer [eos] in at most n + 1 ids."""
    tok = self._tokenizer
    if task == COPY:
      return self._copy_sample(n, rng)
    # ids = [bos] + prompt + answer + [eos] holds n + 1 tokens at most.
    prompt_len = n - 1 - ANSWER_ROOM - self._slack
    if prompt_len < 1:  # make_sample names the length a too-short prompt would need
      raise ValueError(f"retrieval_mix needs data.seq_len > {1 + ANSWER_ROOM + self._slack}, "
                       f"got {n}")
    sample = make_sample(task, tok, prompt_len, depth=float(rng.uniform()),
                         seed=_TASK_SEED_BASE + (self._shard << 36) + index,
                         haystack=haystack, corpus=self._corpus, text_split="train")
    ids = [tok.bos_id] + tok.encode(sample.prompt) + tok.encode(answer_text(sample)) \
        + [tok.eos_id]
    if len(ids) > n + 1:
      raise ValueError(f"a generated {task} sample took {len(ids)} tokens, more than {n + 1}: "
                       f"its answer is longer than ANSWER_ROOM={ANSWER_ROOM}")
    return ids

  def _copy_sample(self, n: int, rng) -> list[int]:
    """[bos] s s [eos] in at most n + 1 ids (s's tokens decided once: a BPE could merge
    differently across the seam, so the second copy repeats the first's ids)."""
    tok = self._tokenizer
    if n < _COPY_MIN_LEN:
      raise ValueError(f"retrieval_mix: a copy sample needs at least {_COPY_MIN_LEN} tokens, "
                       f"got {n}")
    size = int(np.exp(rng.uniform(np.log(2), np.log(len(_COPY_ALPHABET) + 1))))
    alphabet = rng.choice(_COPY_ALPHABET, size=min(size, len(_COPY_ALPHABET)), replace=False)
    chars = alphabet[rng.integers(len(alphabet), size=n)].tobytes().decode()
    s = tok.encode(chars)[:(n - 1) // 2]
    return [tok.bos_id] + s + s + [tok.eos_id]

  def _min_len(self, task: str) -> int:
    """The shortest sample (positions) of `task`: its instructions, needles and question, with
    room for the longest random keys (one sample's fixed part varies by tens of tokens)."""
    if task == COPY:
      return _COPY_MIN_LEN
    if task not in self._min_lens:
      n = 128
      while True:
        try:
          for seed in range(8):
            make_sample(task, self._tokenizer, n - 1 - ANSWER_ROOM - self._slack, seed=seed)
          break
        except ValueError:
          n += 32
      self._min_lens[task] = n + 64
    return self._min_lens[task]

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "retrieval_batches": self._batches}

  def set_state(self, state: dict) -> None:
    if "retrieval_batches" not in state:
      raise ValueError("the checkpoint's data state was written without retrieval_mix; resume "
                       "it with retrieval_mix.fraction=0 or start a new workdir")
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._batches = int(state["retrieval_batches"])

  def close(self) -> None:
    close = getattr(self._parent, "close", None)
    if close is not None:
      close()
