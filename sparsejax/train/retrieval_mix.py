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

from sparsejax.eval.tasks import HAYSTACKS, TASKS, answer_text, make_sample

_TASK_SEED_BASE = 2 ** 43
_SALT = 0x3E7A1
# Tokens kept free after the prompt for the answer and eos. The longest answer of the needle
# tasks (multi_value / multi_query: four 7-digit numbers) is 37 bytes; variable_tracking's five
# names 35; word lists are longer, hence the check in `_row`.
ANSWER_ROOM = 64


def _names(value, name: str, allowed) -> tuple[str, ...]:
  items = tuple(x.strip() for x in value.split(",") if x.strip()) if isinstance(value, str) \
      else tuple(value)
  if not items or set(items) - set(allowed):
    raise ValueError(f"retrieval_mix.{name} must name some of {sorted(allowed)} (comma-"
                     f"separated), got {value!r}")
  return items


@dataclasses.dataclass(frozen=True)
class RetrievalMixConfig:
  """`fraction` of the rows of every batch are tasks drawn uniformly from `tasks`, on a haystack
  drawn from `haystacks`, needle depth uniform in [0, 1]. 0 turns the mix off."""
  fraction: float = 0.0
  tasks: tuple[str, ...] = ("passkey", "multi_key", "multi_value", "multi_query")
  haystacks: tuple[str, ...] = ("noise", "corpus")

  def __post_init__(self):
    f = self.fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
      raise ValueError(f"retrieval_mix.fraction must be a number in [0, 1], got {f!r}")
    object.__setattr__(self, "tasks", _names(self.tasks, "tasks", TASKS))
    object.__setattr__(self, "haystacks", _names(self.haystacks, "haystacks", HAYSTACKS))

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
    # A BPE may merge across the pieces of a prompt and land a few tokens off its target.
    self._slack = 0 if getattr(tokenizer, "kind", None) == "byte" else 16

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    index, self._batches = self._batches, self._batches + 1
    rows = batch["inputs"].shape[0]
    rng = np.random.default_rng([self._seed, _SALT, self._shard, index])
    chosen = np.flatnonzero(rng.uniform(size=rows) < self._mix.fraction)
    if not len(chosen):
      return batch
    batch = {k: np.array(v) for k, v in batch.items()}
    for r in chosen:
      row = self._row(index * rows + int(r), batch["inputs"].shape[1])
      for k, v in row.items():
        batch[k][r] = v
    return batch

  def _row(self, example: int, seq_len: int) -> dict[str, np.ndarray]:
    tok, mix = self._tokenizer, self._mix
    rng = np.random.default_rng([self._seed, _SALT, self._shard, example, 1])
    task = mix.tasks[int(rng.integers(len(mix.tasks)))]
    haystack = mix.haystacks[int(rng.integers(len(mix.haystacks)))]
    # ids = [bos] + prompt + answer + [eos] holds seq_len + 1 tokens at most.
    prompt_len = seq_len - 1 - ANSWER_ROOM - self._slack
    if prompt_len < 1:  # make_sample names the length a too-short prompt would need
      raise ValueError(f"retrieval_mix needs data.seq_len > {1 + ANSWER_ROOM + self._slack}, "
                       f"got {seq_len}")
    sample = make_sample(task, tok, prompt_len, depth=float(rng.uniform()),
                         seed=_TASK_SEED_BASE + (self._shard << 32) + example,
                         haystack=haystack, corpus=self._corpus, text_split="train")
    ids = [tok.bos_id] + tok.encode(sample.prompt) + tok.encode(answer_text(sample)) \
        + [tok.eos_id]
    if len(ids) > seq_len + 1:
      raise ValueError(f"a generated {task} row took {len(ids)} tokens, more than data.seq_len + "
                       f"1 = {seq_len + 1}: its answer is longer than ANSWER_ROOM={ANSWER_ROOM}")
    n = len(ids) - 1
    row = {"inputs": np.full(seq_len, tok.pad_id, np.int32),
           "targets": np.full(seq_len, tok.pad_id, np.int32),
           "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.int32)}
    row["inputs"][:n] = ids[:-1]
    row["targets"][:n] = ids[1:]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    row["loss_mask"][:n] = 1
    return row

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
