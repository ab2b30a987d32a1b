import os
import sys

import pytest

# Tests import the repo's own packages (sparsejax, configs, experiments) from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture
def corpus_splits_read(monkeypatch):
  """The splits the task haystacks and the long-perplexity documents read, in order (their
  text cache cleared before and after, so nothing read earlier hides a read)."""
  from sparsejax.data.corpus import resolve_corpus
  from sparsejax.eval import perplexity, tasks
  splits = []

  def spy(source, split, *args, **kwargs):
    splits.append(split)
    return resolve_corpus(source, split, *args, **kwargs)

  monkeypatch.setattr(tasks, "resolve_corpus", spy)
  monkeypatch.setattr(perplexity, "resolve_corpus", spy)
  tasks._split_texts.cache_clear()
  yield splits
  tasks._split_texts.cache_clear()
