"""RULER-style synthetic long-context tasks, generated offline and sized in tokens.

Every generator is deterministic in its seed (a `numpy.random.Generator`) and tokenizer-agnostic:
the prompt is grown or cut, in tokens of the tokenizer it is given, until
`len(tokenizer.encode(prompt))` is the requested length (or within a few tokens of it, where a
BPE merges across the boundary of two pieces). So a "4k" sample means 4096 tokens of *this*
model's tokenizer, whether it is byte-level or BPE.

Tasks (after RULER, Hsieh et al. 2024):
  passkey            one needle ("The pass key is 12345. ...") in a haystack; recall the key.
  multi_key          several needles with different keys; recall the value of one of them.
  multi_value        one key with several values spread over the haystack; recall all values.
  multi_query        several keys; recall the value of each.
  variable_tracking  chains "VAR A = 12345. VAR B = A. ..." plus a distractor chain; name every
                     variable holding the value.
  common_words       a list of words, a few repeated more often than the rest; name them.
  frequent_words     a Zipf-distributed "coded" text; name its three most frequent words.

Haystacks: "noise" repeats RULER's filler sentences ("The grass is green. ..."); "corpus" is real
text from the VALIDATION split of a corpus (never the training split, so a model cannot have
memorised it). Training mixtures (`sparsejax.train.retrieval_mix`, Locret's examples) pass
`text_split="train"` so that the text they train on is never what evaluation reads. Needle depth d in [0, 1] places the needle after the haystack piece whose end is
nearest to the fraction d of the haystack's tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from sparsejax.data.corpus import read_text, resolve_corpus

HAYSTACKS = ("noise", "corpus")
TEXT_SPLITS = ("validation", "train")
NOISE_SENTENCES = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ",
                   "Here we go. ", "There and back again. ")
# Tasks whose needles sit at a chosen depth; the others (word lists) ignore `depth`.
DEPTH_TASKS = frozenset({"passkey", "multi_key", "multi_value", "multi_query",
                         "variable_tracking"})
NUM_MULTI = 4        # needles / values / queries of the multi_* tasks
VT_HOPS = 4          # variable_tracking: assignments after the first one
FWE_TOP = 3          # frequent_words: answers
FWE_ALPHA = 2.0      # frequent_words: Zipf exponent, as RULER

_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True)
class Sample:
  """One prompt and the strings a correct completion contains (all of them)."""
  prompt: str
  answers: tuple[str, ...]
  task: str
  length: int   # len(tokenizer.encode(prompt)); the model sees [bos] + these tokens
  depth: float  # needle depth; 0.0 for the word-list tasks, which have no needle


# ---------------------------------------------------------------------------------------------
# Random strings.

def _number(rng: np.random.Generator, digits: int) -> str:
  return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _distinct(make: Callable[[], str], n: int, taken: set[str] | None = None) -> list[str]:
  """n distinct strings from `make`, none in `taken` (which is updated)."""
  taken = set() if taken is None else taken
  out = []
  while len(out) < n:
    s = make()
    if s not in taken:
      taken.add(s)
      out.append(s)
  return out


def _pseudo_word(rng: np.random.Generator, syllables: tuple[int, int] = (2, 4)) -> str:
  """A pronounceable made-up word ("tobaku"): no tokenizer or model has a prior for it, and the
  supply is practically unlimited, so a 128k-token word list needs no dictionary download."""
  n = int(rng.integers(syllables[0], syllables[1]))
  return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                 for _ in range(n))


def _var_name(rng: np.random.Generator) -> str:
  return "".join(chr(ord("A") + int(i)) for i in rng.integers(0, 26, size=5))


# ---------------------------------------------------------------------------------------------
# Haystacks: endless streams of text pieces; needles go between pieces.

def _noise_pieces() -> Iterator[str]:
  while True:
    yield from NOISE_SENTENCES


@functools.lru_cache(maxsize=4)
def _split_texts(corpus: str, split: str) -> tuple[str, ...]:
  """Texts of the corpus's files of `split` (cached: every sample of a run reads them)."""
  texts = tuple(read_text(p) for p in resolve_corpus(corpus, split))
  if not any(t.strip() for t in texts):
    raise ValueError(f"corpus={corpus!r}: the {split} split holds no text")
  return texts


def _corpus_pieces(texts: Sequence[str], start: int) -> Iterator[str]:
  """Non-blank lines of the validation split, from file `start` on, wrapping around."""
  while True:
    for i in range(len(texts)):
      for line in texts[(start + i) % len(texts)].splitlines(keepends=True):
        if line.strip():
          yield line if line.endswith("\n") else line + "\n"


def _haystack(kind: str, rng: np.random.Generator, corpus: str, text_split: str):
  """(piece stream factory, separator after a needle). The factory restarts the same stream, so
  `_fit` can re-measure the same text with another budget."""
  if kind == "noise":
    return _noise_pieces, " "
  if kind == "corpus":
    texts = _split_texts(corpus, text_split)
    start = int(rng.integers(len(texts)))
    return (lambda: _corpus_pieces(texts, start)), "\n"
  raise ValueError(f"haystack must be one of {HAYSTACKS}, got haystack={kind!r}")


def _fit(tokenizer, length: int, *, prefix: str, question: str, pieces: Callable[[], Iterator[str]],
         needles: Sequence[str] = (), depths: Sequence[float] = (), core: str = "") -> str:
  """prefix + core + haystack (needles inserted at their depths) + question, `length` tokens.

  The haystack is cut at a token boundary to fill the budget left by the fixed parts. Token
  counts of separately encoded pieces add up exactly for the byte tokenizer; a BPE may merge
  across a boundary, so the whole prompt is re-measured and the budget corrected.
  """
  enc = lambda s: len(tokenizer.encode(s))
  fixed = enc(prefix + core + question) + sum(enc(n) for n in needles)
  budget = length - fixed
  best, best_err = None, None
  cache: dict[str, int] = {}
  tried: set[int] = set()
  for _ in range(12):
    if budget < 0:
      raise ValueError(f"length={length} tokens is too short for this task: its instructions, "
                       f"question and needles alone take {fixed} tokens")
    texts, counts, total = [], [], 0
    stream = pieces()
    tail = ""
    while total < budget:
      piece = next(stream)
      n = cache.get(piece)
      if n is None:
        n = cache[piece] = enc(piece)
      if total + n > budget:  # cut the last piece at a token boundary
        ids = tokenizer.encode(piece)[:budget - total]
        tail = tokenizer.decode(ids)
        total = budget
        break
      texts.append(piece)
      counts.append(n)
      total += n
    bounds = np.concatenate([[0], np.cumsum(counts)]) if counts else np.zeros(1)
    at: dict[int, list[str]] = {}
    for needle, d in zip(needles, depths):
      at.setdefault(int(np.argmin(np.abs(bounds - d * total))), []).append(needle)
    parts = [prefix, core]
    for i in range(len(texts) + 1):
      parts.extend(at.get(i, ()))
      if i < len(texts):
        parts.append(texts[i])
    prompt = "".join(parts) + tail + question
    err = length - enc(prompt)
    if best_err is None or abs(err) < abs(best_err):
      best, best_err = prompt, err
    if err == 0:
      break
    # n(budget) is monotone up to merges at the cut; step past budgets already tried so the
    # correction cannot cycle between two values on either side of the target.
    tried.add(budget)
    budget += err
    while budget in tried:
      budget += 1 if err > 0 else -1
  return best


def _check(length: int, depth: float) -> None:
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
    raise ValueError(f"length must be a positive int (tokens), got length={length!r}")
  if not 0.0 <= float(depth) <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got depth={depth!r}")


# ---------------------------------------------------------------------------------------------
# Needle tasks.

_NIAH_PREFIX = ("Some special magic numbers are hidden inside the text below. "
                "Memorize them; you will be asked about them.\n")


def _magic(key: str, value: str, sep: str) -> str:
  return f"One of the special magic numbers for {key} is: {value}.{sep}"


def _random_depths(rng: np.random.Generator, n: int) -> list[float]:
  return [float(x) for x in rng.uniform(0.0, 1.0, size=n)]


def passkey(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
            haystack: str = "noise", corpus: str = "stdlib",
            text_split: str = "validation") -> Sample:
  _check(length, depth)
  pieces, sep = _haystack(haystack, rng, corpus, text_split)
  key = _number(rng, 5)
  prompt = _fit(tokenizer, length,
                prefix="A pass key is hidden inside the text below. Find it and remember it.\n",
                needles=[f"The pass key is {key}. Remember it. {key} is the pass key.{sep}"],
                depths=[depth], pieces=pieces,
                question="\nWhat is the pass key? The pass key is")
  return Sample(prompt, (key,), "passkey", len(tokenizer.encode(prompt)), float(depth))


def multi_key(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
              haystack: str = "noise", corpus: str = "stdlib",
              text_split: str = "validation") -> Sample:
  """The asked needle sits at `depth`; NUM_MULTI - 1 distractors at random depths."""
  _check(length, depth)
  pieces, sep = _haystack(haystack, rng, corpus, text_split)
  keys = _distinct(lambda: _pseudo_word(rng), NUM_MULTI)
  values = _distinct(lambda: _number(rng, 7), NUM_MULTI)
  prompt = _fit(tokenizer, length, prefix=_NIAH_PREFIX, pieces=pieces,
                needles=[_magic(k, v, sep) for k, v in zip(keys, values)],
                depths=[depth] + _random_depths(rng, NUM_MULTI - 1),
                question=(f"\nWhat is the special magic number for {keys[0]} mentioned in the "
                          f"text above? The special magic number for {keys[0]} is"))
  return Sample(prompt, (values[0],), "multi_key", len(tokenizer.encode(prompt)), float(depth))


def multi_value(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
                haystack: str = "noise", corpus: str = "stdlib",
                text_split: str = "validation") -> Sample:
  """The first value sits at `depth`, the others at random depths."""
  _check(length, depth)
  pieces, sep = _haystack(haystack, rng, corpus, text_split)
  key = _pseudo_word(rng)
  values = _distinct(lambda: _number(rng, 7), NUM_MULTI)
  prompt = _fit(tokenizer, length, prefix=_NIAH_PREFIX, pieces=pieces,
                needles=[_magic(key, v, sep) for v in values],
                depths=[depth] + _random_depths(rng, NUM_MULTI - 1),
                question=(f"\nWhat are all the special magic numbers for {key} mentioned in the "
                          f"text above? The special magic numbers for {key} are"))
  return Sample(prompt, tuple(values), "multi_value", len(tokenizer.encode(prompt)), float(depth))


def multi_query(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
                haystack: str = "noise", corpus: str = "stdlib",
                text_split: str = "validation") -> Sample:
  """The first key's needle sits at `depth`, the others at random depths."""
  _check(length, depth)
  pieces, sep = _haystack(haystack, rng, corpus, text_split)
  keys = _distinct(lambda: _pseudo_word(rng), NUM_MULTI)
  values = _distinct(lambda: _number(rng, 7), NUM_MULTI)
  asked = ", ".join(keys[:-1]) + f" and {keys[-1]}"
  prompt = _fit(tokenizer, length, prefix=_NIAH_PREFIX, pieces=pieces,
                needles=[_magic(k, v, sep) for k, v in zip(keys, values)],
                depths=[depth] + _random_depths(rng, NUM_MULTI - 1),
                question=(f"\nWhat are the special magic numbers for {asked} mentioned in the "
                          f"text above? The special magic numbers for {asked} are"))
  return Sample(prompt, tuple(values), "multi_query", len(tokenizer.encode(prompt)), float(depth))


def variable_tracking(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
                      haystack: str = "noise", corpus: str = "stdlib",
                      text_split: str = "validation") -> Sample:
  """The chain's first assignment sits at `depth` and its hops spread evenly after it, so the
  chain always reads forward; a distractor chain with another value lies at random depths."""
  _check(length, depth)
  pieces, sep = _haystack(haystack, rng, corpus, text_split)
  names = _distinct(lambda: _var_name(rng), 2 * (VT_HOPS + 1))
  value, other = _distinct(lambda: _number(rng, 5), 2)

  def chain(vars_, val):
    return [f"VAR {vars_[0]} = {val}.{sep}"] + [
        f"VAR {vars_[i]} = {vars_[i - 1]}.{sep}" for i in range(1, len(vars_))]

  target, distract = names[:VT_HOPS + 1], names[VT_HOPS + 1:]
  depths = [depth + (1.0 - depth) * i / (VT_HOPS + 1) for i in range(VT_HOPS + 1)]
  depths += sorted(_random_depths(rng, VT_HOPS + 1))
  prompt = _fit(tokenizer, length, prefix="Memorize the variable assignments in the text below.\n",
                needles=chain(target, value) + chain(distract, other), depths=depths,
                pieces=pieces,
                question=(f"\nFind all variables that are assigned the value {value} in the text "
                          f"above. Answer: the variables assigned the value {value} are"))
  return Sample(prompt, tuple(target), "variable_tracking", len(tokenizer.encode(prompt)),
                float(depth))


# ---------------------------------------------------------------------------------------------
# Word-list (aggregation) tasks. A "core" list carries the counts; unique filler words (each once,
# so never among the most frequent) pad the prompt to the exact length.

def _filler_words(rng: np.random.Generator, taken: set[str]) -> Callable[[], Iterator[str]]:
  """Unique new words; every restart of the stream replays the same words (drawn once)."""
  drawn: list[str] = []

  def stream():
    for i in itertools.count():
      if i == len(drawn):
        drawn.extend(" " + w for w in _distinct(lambda: _pseudo_word(rng, (3, 5)), 1, taken))
      yield drawn[i]
  return stream


def _capacity(tokenizer, rng: np.random.Generator, budget: int) -> int:
  """How many " word" items fit in `budget` tokens, with 10% slack left for the exact fill."""
  per = np.mean([len(tokenizer.encode(" " + _pseudo_word(rng))) for _ in range(64)])
  return int(0.9 * budget / per)


def _word_list(tokenizer, length: int, rng: np.random.Generator, prefix: str, question: str,
               build) -> tuple[str, tuple[str, ...]]:
  """Fits `build(capacity, taken) -> (core words, answers, question)` into `length` tokens.

  The capacity comes from the mean token count of a random word; the repeated words of one
  sample can be longer than that mean, so a core over the budget is rebuilt with a smaller one.
  """
  budget = length - len(tokenizer.encode(prefix + question))
  cap = _capacity(tokenizer, rng, budget)
  for _ in range(8):
    taken: set[str] = set()
    words, answers, question_ = build(cap, taken)
    core = "".join(" " + w for w in words)
    used = len(tokenizer.encode(prefix + core + question_))
    if used <= length:
      prompt = _fit(tokenizer, length, prefix=prefix, core=core, question=question_,
                    pieces=_filler_words(rng, taken))
      return prompt, answers
    cap = int(cap * 0.9 * (length - (used - len(tokenizer.encode(core)))) / max(1, used))
  raise ValueError(f"length={length} tokens is too short for this word-list task")


def common_words(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
                 haystack: str = "noise", corpus: str = "stdlib",
                 text_split: str = "validation") -> Sample:
  """RULER's CWE: `num_cw` words appear `freq_cw` times, the others `freq_ucw` < freq_cw times.
  At 4k+ tokens that is RULER's 10 words x 30 vs 3; shorter prompts scale the counts down."""
  del haystack, corpus  # the list is the whole context
  _check(length, depth)
  prefix = "Below is a list of words. Some of them appear more often than the others.\n"
  probe = "\nWhat are the 10 most common words in the list above? Answer: the most common words are"

  def build(cap, taken):
    num_cw = min(10, cap // 8)
    if num_cw < 1:
      raise ValueError(f"length={length} tokens is too short for common_words")
    freq_cw = min(30, max(2, cap // (2 * num_cw)))
    freq_ucw = min(3, freq_cw - 1)
    common = _distinct(lambda: _pseudo_word(rng), num_cw, taken)
    uncommon = _distinct(lambda: _pseudo_word(rng), (cap - num_cw * freq_cw) // freq_ucw, taken)
    words = common * freq_cw + uncommon * freq_ucw
    question = (f"\nWhat are the {num_cw} most common words in the list above? Answer: the most "
                "common words are")
    return [words[i] for i in rng.permutation(len(words))], tuple(common), question

  prompt, answers = _word_list(tokenizer, length, rng, prefix, probe, build)
  return Sample(prompt, answers, "common_words", len(tokenizer.encode(prompt)), 0.0)


def frequent_words(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
                   haystack: str = "noise", corpus: str = "stdlib",
                   text_split: str = "validation") -> Sample:
  """RULER's FWE: coded words with Zipf(alpha=2) counts; the top three are strictly more frequent
  than every other word (counts are set, then shuffled, so the answer is never a tie)."""
  del haystack, corpus
  _check(length, depth)
  prefix = "Read the coded text below and count how often each coded word appears.\n"
  question = ("\nWhat are the three most frequently appearing coded words in the text above? "
              "Answer: the three most frequent coded words are")

  def build(cap, taken):
    if cap < 9:  # counts 4, 3, 2 at the least
      raise ValueError(f"length={length} tokens is too short for frequent_words")
    vocab = max(FWE_TOP + 1, cap // 8)
    p = 1.0 / np.arange(1, vocab + 1) ** FWE_ALPHA
    counts = np.floor(cap * p / p.sum()).astype(int)
    counts[FWE_TOP:] = np.minimum(counts[FWE_TOP:], max(1, counts[FWE_TOP - 1] - 1))
    for i in range(FWE_TOP - 1, -1, -1):  # strictly decreasing top, each above the rest
      counts[i] = max(counts[i], counts[i + 1] + 1, 2)
    words = _distinct(lambda: _pseudo_word(rng), vocab, taken)
    text = [w for w, c in zip(words, counts) for _ in range(int(c))]
    return [text[i] for i in rng.permutation(len(text))], tuple(words[:FWE_TOP]), question

  prompt, answers = _word_list(tokenizer, length, rng, prefix, question, build)
  return Sample(prompt, answers, "frequent_words", len(tokenizer.encode(prompt)), 0.0)


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "multi_key": multi_key,
    "multi_value": multi_value,
    "multi_query": multi_query,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}


def make_sample(task: str, tokenizer, length: int, depth: float = 0.5, seed: int = 0,
                haystack: str = "noise", corpus: str = "stdlib",
                text_split: str = "validation") -> Sample:
  """One sample of `task`, `length` tokens of `tokenizer`; the same arguments give the same
  sample. The seed is mixed with the task name, length and depth so that cells of a sweep do not
  share their keys. `text_split`: the corpus split a "corpus" haystack reads ("validation" for
  evaluation, "train" for training mixtures)."""
  if task not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)}, got task={task!r}")
  if haystack not in HAYSTACKS:
    raise ValueError(f"haystack must be one of {HAYSTACKS}, got haystack={haystack!r}")
  if text_split not in TEXT_SPLITS:
    raise ValueError(f"text_split must be one of {TEXT_SPLITS}, got text_split={text_split!r}")
  _check(length, depth)
  mix = [int(seed), int(length), int(round(float(depth) * 1e6))] + list(task.encode())
  rng = np.random.default_rng(mix)
  return TASKS[task](tokenizer, int(length), float(depth), rng, haystack=haystack, corpus=corpus,
                     text_split=text_split)


def answer_text(sample: Sample) -> str:
  """The gold completion of a prompt, as training data spells it: " a, b, c." (the harness
  scores any completion containing every answer)."""
  return " " + ", ".join(sample.answers) + "."
