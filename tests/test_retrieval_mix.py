"""Generated retrieval rows in training batches: layout, determinism, resume, data hygiene."""
import re

import numpy as np
import pytest

from sparsejax.data import DataConfig, build_tokenizer, make_train_iterator
from sparsejax.data.corpus import resolve_corpus
from sparsejax.eval import tasks
from sparsejax.eval.harness import score
from sparsejax.train.retrieval_mix import RetrievalMixConfig, RetrievalMixIterator

SEQ = 1024
DATA = DataConfig(seq_len=SEQ, batch_size=6)
TOK = build_tokenizer(DATA)


def mixed(fraction, seed=0, **mix):
  return RetrievalMixIterator(make_train_iterator(DATA, TOK), TOK,
                              RetrievalMixConfig(fraction=fraction, **mix), corpus="stdlib",
                              seed=seed)


def text(ids):
  return TOK.decode([int(i) for i in ids if i < 256])


def test_no_fraction_leaves_batches_alone():
  plain, mix = make_train_iterator(DATA, TOK), mixed(0.0)
  for _ in range(3):
    a, b = next(plain), next(mix)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_every_row_is_a_task_followed_by_its_answer():
  it = mixed(1.0)
  seen = set()
  for _ in range(3):
    b = next(it)
    for r in range(DATA.batch_size):
      n = int(b["loss_mask"][r].sum())
      assert n > SEQ - 80  # the prompt fills the row, the answer and eos end it
      assert b["inputs"][r, 0] == TOK.bos_id and b["targets"][r, n - 1] == TOK.eos_id
      np.testing.assert_array_equal(b["inputs"][r, 1:n], b["targets"][r, :n - 1])
      np.testing.assert_array_equal(b["segment_ids"][r], (np.arange(SEQ) < n).astype(int))
      np.testing.assert_array_equal(b["positions"][r, :n], np.arange(n))
      assert (b["inputs"][r, n:] == TOK.pad_id).all() and (b["positions"][r, n:] == 0).all()
      body = text(b["inputs"][r, :n])
      seen.add(body.splitlines()[0][:20])
      # The question's last words, then the gold numbers: what the harness would score 1.
      answer = re.fullmatch(r".*(?: is| are)((?: \d+,?)+)\.", body.splitlines()[-1])
      assert answer, body.splitlines()[-1]
      numbers = answer.group(1).replace(",", "").split()
      assert score(answer.group(1), numbers) == 1.0
  assert len(seen) >= 2  # several task formats drawn


def test_rows_replaced_follow_the_fraction_and_the_seed():
  counts = []
  for _ in range(2):
    it, n = mixed(0.5, seed=3), 0
    for _ in range(8):
      b = next(it)
      n += sum(text(b["inputs"][r, :12]).startswith(("A pass", "Some spec"))
               for r in range(DATA.batch_size))
    counts.append(n)
  assert counts[0] == counts[1] and 12 <= counts[0] <= 36  # 48 rows at 0.5
  a, b = next(mixed(0.5, seed=3)), next(mixed(0.5, seed=4))
  assert not all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_continues_with_the_same_rows():
  it = mixed(0.5)
  next(it)
  state = it.get_state()
  expect = [next(it) for _ in range(2)]
  again = mixed(0.5)
  again.set_state(state)
  for e in expect:
    got = next(again)
    assert all(np.array_equal(e[k], got[k]) for k in e)
  with pytest.raises(ValueError, match="without retrieval_mix"):
    again.set_state(make_train_iterator(DATA, TOK).get_state())


def test_corpus_haystacks_read_the_training_split_only(corpus_splits_read):
  b = next(mixed(1.0, haystacks="corpus", tasks="passkey"))
  assert corpus_splits_read and set(corpus_splits_read) == {"train"}
  train_text = "".join(tasks.read_text(p) for p in resolve_corpus("stdlib", "train"))
  lines = [l for l in text(b["inputs"][0]).splitlines()[1:-2]
           if len(l.strip()) > 30 and "pass key" not in l]
  assert len(lines) > 3 and all(l in train_text for l in lines)


@pytest.mark.parametrize("field, value, match", [
    ("fraction", 1.5, "fraction must be a number in"),
    ("tasks", "passkey,nope", "tasks must name some of"),
    ("haystacks", "", "haystacks must name some of"),
    ("early_fraction", -0.1, "early_fraction must be a number in"),
    ("early_batches", 1.5, "early_batches must be an int >= 0"),
    ("early_tasks", "copy,nope", "early_tasks must name some of"),
])
def test_bad_config_is_named(field, value, match):
  with pytest.raises(ValueError, match=match):
    RetrievalMixConfig(**{field: value})


@pytest.mark.parametrize("min_length, match", [
    (0, "too short for this task"),
    (1, "multi_query sample needs at least .* data.seq_len=200")])
def test_rows_too_short_for_the_task_are_refused(min_length, match):
  short = DataConfig(seq_len=200, batch_size=2)
  it = RetrievalMixIterator(make_train_iterator(short, TOK), TOK,
                            RetrievalMixConfig(fraction=1.0, tasks="multi_query",
                                               min_length=min_length),
                            corpus="stdlib", seed=0)
  with pytest.raises(ValueError, match=match):
    next(it)


def test_rows_pack_samples_of_several_lengths():
  it = mixed(1.0, tasks="passkey", min_length=1)
  lengths, segments = [], []
  for _ in range(2):
    b = next(it)
    for r in range(DATA.batch_size):
      seg = b["segment_ids"][r]
      segments.append(seg.max())
      assert (seg[:SEQ - 320] > 0).all()  # no padding where another passkey would have fit
      for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all()  # contiguous, in order
        np.testing.assert_array_equal(b["positions"][r, where], np.arange(len(where)))
        assert b["inputs"][r, where[0]] == TOK.bos_id
        assert b["targets"][r, where[-1]] == TOK.eos_id
        assert "pass key is" in text(b["inputs"][r, where])
        lengths.append(len(where))
  assert max(segments) >= 2 and min(lengths) < 500 < max(lengths)  # log-uniform lengths, short and long


def test_early_batches_use_the_early_fraction_and_tasks_then_the_main_ones():
  # Two early batches of copy rows only (every row), then batches with no task rows at all.
  it = mixed(0.0, tasks="passkey", early_batches=2, early_fraction=1.0, early_tasks="copy",
             min_length=1)
  plain = make_train_iterator(DATA, TOK)
  for index in range(4):
    b, p = next(it), next(plain)
    if index < 2:
      assert all(b["inputs"][r, 0] == TOK.bos_id for r in range(DATA.batch_size))
      assert not any("pass key is" in text(b["inputs"][r]) for r in range(DATA.batch_size))
    else:
      assert all(np.array_equal(b[k], p[k]) for k in b)
  config = RetrievalMixConfig(fraction=0.0, early_batches=2, early_fraction=0.5)
  assert config.active and config.stage(1) == (0.5, config.tasks)
  assert config.stage(2) == (0.0, config.tasks)  # early_tasks default to tasks
  assert not RetrievalMixConfig(early_batches=3).active


def test_min_length_is_checked():
  with pytest.raises(ValueError, match="min_length must be an int >= 0"):
    RetrievalMixConfig(min_length=-1)


def test_copy_rows_repeat_a_random_string():
  it = mixed(1.0, tasks="copy", min_length=1)
  strings = set()
  b = next(it)
  for r in range(DATA.batch_size):
    seg = b["segment_ids"][r]
    assert (seg > 0).sum() >= SEQ - 16  # packed copy samples fill the row
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      ids = np.append(b["inputs"][r, where], b["targets"][r, where[-1]])
      assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
      body = ids[1:-1]
      half = len(body) // 2
      assert len(body) == 2 * half and half >= 7
      np.testing.assert_array_equal(body[:half], body[half:])
      strings.add(text(body[:half]))
  assert len(strings) > DATA.batch_size  # several samples a row, all different
