"""Long-context eval: task generators, scorer, harness, long perplexity and the binary (CPU)."""
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ModelConfig
from sparsejax.data.corpus import read_text, resolve_corpus, stdlib_files
from sparsejax.data.tokenizers import BPETokenizer, ByteTokenizer
from sparsejax.eval import (TASKS, compare_methods, evaluate, harness,
                            long_documents, long_perplexity, make_sample, score,
                            tasks, write_results)
from sparsejax.model import DecoderLM
from tests.test_experiments import run as run_module

BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def bpe():
  texts = [read_text(p) for p in resolve_corpus("stdlib", "train")[:40]]
  return BPETokenizer.train(texts, 600)


@pytest.fixture(scope="module")
def tiny_model():
  cfg = ModelConfig(vocab_size=BYTE.vocab_size, d_model=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=16, ffn_hidden=64, max_seq_len=1024, dtype="float32")
  return DecoderLM(cfg, rngs=nnx.Rngs(0))


def _token_offset(tok, prompt: str, needle: str) -> int:
  return len(tok.encode(prompt[:prompt.index(needle)]))


@pytest.mark.parametrize("haystack", ["noise", "corpus"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_requested_length_byte_and_bpe(task, haystack, bpe):
  for tok, length in ((BYTE, 1500), (bpe, 700), (bpe, 3000)):
    s = make_sample(task, tok, length, 0.4, seed=3, haystack=haystack)
    assert s.length == len(tok.encode(s.prompt))
    assert abs(s.length - length) <= 3, (tok, length, s.length)
    assert s.task == task and s.answers


def test_too_short_and_bad_arguments():
  with pytest.raises(ValueError, match="length=64"):
    make_sample("multi_query", BYTE, 64, 0.5)
  with pytest.raises(ValueError, match="depth"):
    make_sample("passkey", BYTE, 1024, 1.5)
  with pytest.raises(ValueError, match="task"):
    make_sample("nope", BYTE, 1024, 0.5)
  with pytest.raises(ValueError, match="haystack"):
    make_sample("passkey", BYTE, 1024, 0.5, haystack="wiki")


@pytest.mark.parametrize("haystack", ["noise", "corpus"])
def test_needle_at_requested_depth(haystack, bpe):
  for tok, length in ((BYTE, 4096), (bpe, 2048)):
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
      s = make_sample("passkey", tok, length, depth, seed=1, haystack=haystack)
      needle = f"The pass key is {s.answers[0]}."
      assert abs(_token_offset(tok, s.prompt, needle) / s.length - depth) < 0.05
      # The asked needle of multi_key sits at the depth too (distractors are elsewhere).
      s = make_sample("multi_key", tok, length, depth, seed=1, haystack=haystack)
      needle = f"is: {s.answers[0]}."
      assert abs(_token_offset(tok, s.prompt, needle) / s.length - depth) < 0.06


def test_answers_occur_in_prompt():
  for task in ("passkey", "multi_key", "multi_value", "multi_query"):
    s = make_sample(task, BYTE, 2048, 0.3, seed=5)
    body = s.prompt[:s.prompt.rindex("\n")]  # the context, without the question
    for a in s.answers:
      assert re.search(rf"(pass key is|magic numbers for \w+ is:) {a}\.", body), (task, a)
  s = make_sample("multi_key", BYTE, 2048, 0.3, seed=5)
  assert len(re.findall(r"magic numbers for \w+ is: \d+\.", s.prompt)) == tasks.NUM_MULTI
  s = make_sample("multi_query", BYTE, 2048, 0.3, seed=5)
  asked = re.findall(r"magic numbers for (\w+) is: (\d+)\.", s.prompt)
  assert len(asked) == tasks.NUM_MULTI and {v for _, v in asked} == set(s.answers)


@pytest.mark.parametrize("haystack", ["noise", "corpus"])
def test_variable_tracking_chain_resolves_to_the_answers(haystack):
  s = make_sample("variable_tracking", BYTE, 3000, 0.2, seed=2, haystack=haystack)
  value = re.search(r"assigned the value (\d+) in the text", s.prompt).group(1)
  assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", s.prompt))
  assert len(assigned) == 2 * (tasks.VT_HOPS + 1)

  def resolve(name):
    while assigned[name] in assigned:
      name = assigned[name]
    return assigned[name]

  holders = {n for n in assigned if resolve(n) == value}
  assert holders == set(s.answers) and len(holders) == tasks.VT_HOPS + 1


def test_word_tasks_answers_are_strictly_most_frequent(bpe):
  for tok, length in ((BYTE, 4096), (bpe, 1500), (BYTE, 512)):
    s = make_sample("common_words", tok, length, 0.0, seed=4)
    words = s.prompt.split("\n")[1].split()
    counts = Counter(words)
    least_common_answer = min(counts[a] for a in s.answers)
    others = [c for w, c in counts.items() if w not in s.answers]
    assert least_common_answer > max(others)
    s = make_sample("frequent_words", tok, length, 0.0, seed=4)
    counts = Counter(s.prompt.split("\n")[1].split())
    top = counts.most_common(4)
    assert tuple(w for w, _ in top[:3]) == s.answers
    assert top[0][1] > top[1][1] > top[2][1] > top[3][1]


def test_deterministic_by_seed():
  for task in TASKS:
    a = make_sample(task, BYTE, 1024, 0.5, seed=7, haystack="corpus")
    assert a == make_sample(task, BYTE, 1024, 0.5, seed=7, haystack="corpus")
    assert a != make_sample(task, BYTE, 1024, 0.5, seed=8, haystack="corpus")


def test_corpus_haystack_uses_the_validation_split_only(corpus_splits_read):
  s = make_sample("passkey", BYTE, 3000, 0.5, seed=0, haystack="corpus")
  long_documents(BYTE, 2048, 2, seed=0)
  assert corpus_splits_read and set(corpus_splits_read) == {"validation"}
  val_text = "".join(read_text(p) for p in resolve_corpus("stdlib", "validation"))
  lines = [l for l in s.prompt.splitlines()[1:-2] if len(l.strip()) > 30 and "pass key" not in l]
  assert len(lines) > 10 and all(l in val_text for l in lines)
  val_files = set(resolve_corpus("stdlib", "validation"))
  assert val_files and not val_files & set(resolve_corpus("stdlib", "train"))
  assert val_files < set(stdlib_files())


def test_score_exact_answers_and_partial_credit():
  assert score("The pass key is 12345.", ["12345"]) == 1.0
  for wrong in ("123456", "1234", "912345", "no idea", ""):
    assert score(wrong, ["12345"]) == 0.0
  assert score("abcde and QWERT", ("ABCDE", "QWERT")) == 1.0  # case-insensitive, as RULER
  assert score("ABCDEF", ("ABCDE",)) == 0.0
  assert score("1111111, 3333333", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
  assert score("2222222", ["1111111", "2222222", "3333333"]) == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match="answers"):
    score("x", [])


def test_evaluate_scores_correct_predictions_as_one(tiny_model, monkeypatch):
  """The plumbing (batching, padding rows, decoding, aggregation), with a completion function
  that reads the pass key out of the prompt: every cell must score 1."""

  def oracle(model, batch, *, max_new_tokens, eos_id, pad_to):
    assert all(len(p) <= pad_to for p in batch) and len(batch) == 3
    keys = [re.search(r"pass key is (\d+)", BYTE.decode(p)).group(1) for p in batch]
    return [BYTE.encode(" " + k + ".") for k in keys]

  monkeypatch.setattr(harness, "generate", oracle)
  r = evaluate(tiny_model, BYTE, ["passkey"], [256, 512], [0.0, 0.5, 1.0], 2, seed=0,
               max_new_tokens=8, batch_size=3)
  assert r["avg_score"] == 1.0 and len(r["samples"]) == 12
  assert set(r["cells"]["passkey"][512]) == {0.0, 0.5, 1.0}
  with pytest.raises(ValueError, match="lengths"):
    evaluate(tiny_model, BYTE, ["passkey"], [1020], [0.5], max_new_tokens=8)
  with pytest.raises(ValueError, match="tasks"):
    evaluate(tiny_model, BYTE, ["nope"], [256], [0.5])


def test_evaluate_and_long_perplexity_end_to_end(tiny_model, tmp_path):
  r = evaluate(tiny_model, BYTE, ["passkey", "common_words"], [256, 384], [0.0, 1.0], 1,
               seed=0, max_new_tokens=6, batch_size=2)
  assert set(r["cells"]) == {"passkey", "common_words"}
  assert set(r["cells"]["passkey"][256]) == {0.0, 1.0}
  assert set(r["cells"]["common_words"][384]) == {0.0}  # no needle: one depth
  assert len(r["samples"]) == 8 and all(0 <= x["score"] <= 1 for x in r["samples"])
  assert 0.0 <= r["avg_score"] <= 1.0

  ppl = long_perplexity(tiny_model, BYTE, [256, 512], tail=64, num_docs=2, seed=0)
  assert set(ppl) == {256, 512} and all(np.isfinite(v) and v > 1 for v in ppl.values())
  # An untrained model over 259 tokens is close to uniform.
  assert all(50 < v < 2000 for v in ppl.values())
  chunked = long_perplexity(tiny_model, BYTE, [512], tail=64, num_docs=2, seed=0, chunk_size=128)
  np.testing.assert_allclose(chunked[512], ppl[512], rtol=1e-4)
  with pytest.raises(ValueError, match="lengths"):
    long_perplexity(tiny_model, BYTE, [2048], tail=64)

  r["method"], r["long_ppl"] = "dense", ppl
  paths = write_results(r, str(tmp_path / "res"))
  for p in paths:
    assert os.path.getsize(p) > 0
  assert os.path.exists(tmp_path / "res_heatmap_passkey.png")
  assert not os.path.exists(tmp_path / "res_heatmap_common_words.png")
  with open(tmp_path / "res_vs_length.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  data = json.load(open(tmp_path / "res.json"))
  assert data["method"] == "dense" and set(data["tasks"]["passkey"]) == {"256", "384"}
  assert data["cells"]["passkey"]["256"].keys() == {"0.0", "1.0"}
  md = open(tmp_path / "res.md").read()
  assert "| passkey |" in md and "long perplexity" in md
  cmp = compare_methods([str(tmp_path / "res.json")] * 2, str(tmp_path / "cmp"))
  assert all(os.path.exists(p) for p in cmp) and open(cmp[0]).read().count("| dense |") == 2


def test_long_documents_are_exact_length_and_distinct():
  docs = long_documents(BYTE, 4096, 3, seed=1)
  assert all(d.shape == (4096,) and d[0] == BYTE.bos_id for d in docs)
  assert len({d.tobytes() for d in docs}) == 3
  assert [d.tobytes() for d in docs] == [d.tobytes() for d in long_documents(BYTE, 4096, 3, 1)]
  with pytest.raises(ValueError, match="length"):
    long_documents(BYTE, 10 ** 8, 1)


def test_binary_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  run_module("experiments.pretrain", "--config=configs/tiny.py", f"--config.workdir={workdir}",
       "--config.train.steps=2", "--config.train.warmup_steps=1", "--config.train.eval_every=0",
       "--config.sample.max_new_tokens=0", "--config.model.num_layers=1",
       "--config.data.seq_len=32", "--config.model.max_seq_len=512")
  out_stem = os.path.join(workdir, "eval_longctx")  # the default --out: beside the run, not results/
  # A sliding window, as InfLLM-V2 keeping only its local blocks, on the dense checkpoint.
  options = {"dense_len": 0, "block_size": 32, "compress_window": 32, "compress_stride": 16,
             "init_blocks": 0, "local_blocks": 2, "topk": 2, "lse_window": 64, "lse_stride": 32}
  out = run_module("experiments.eval_longctx", f"--workdir={workdir}", "--tasks=passkey,frequent_words",
             "--lengths=320,400", "--depths=0,1", "--samples=1", "--max_new_tokens=4",
             "--batch_size=2", "--haystack=corpus", "--method=sliding_window",
             "--attention=infllmv2", f"--attention_options={json.dumps(options)}",
             "--ppl_lengths=300", "--ppl_tail=32", "--ppl_docs=1")
  assert "| passkey |" in out and "| frequent_words |" in out and "sliding_window" in out
  data = json.load(open(out_stem + ".json"))
  assert data["method"] == "sliding_window" and 0.0 <= data["avg_score"] <= 1.0
  assert set(data["tasks"]) == {"passkey", "frequent_words"}
  assert set(data["tasks"]["passkey"]) == {"320", "400"} and set(data["long_ppl"]) == {"300"}
  assert data["config"]["model"]["attention"] == "infllmv2"
  assert data["config"]["model"]["attention_options"]["topk"] == 2
  assert data["config"]["model"]["max_seq_len"] == 512
  for suffix in (".md", "_heatmap_passkey.png", "_vs_length.png"):
    assert os.path.getsize(out_stem + suffix) > 0


def test_paired_bootstrap_intervals():
  from sparsejax.eval import paired_bootstrap

  def records(scores):
    return [{"task": t, "length": 4096, "depth": 0.5, "sample": i, "score": s}
            for t, row in scores.items() for i, s in enumerate(row)]

  rng = np.random.default_rng(0)
  a = {"passkey": rng.integers(0, 2, 60).astype(float), "multi_key": rng.integers(0, 2, 60) * 1.0}
  same = paired_bootstrap(records(a), records(a), reps=200)
  assert same["diff"] == 0 and same["diff_ci95"] == [0.0, 0.0] and same["ratio"] == 1.0
  # b answers every prompt a answers, and 20 more: a strictly positive paired difference.
  b = {t: v.copy() for t, v in a.items()}
  b["passkey"][np.flatnonzero(b["passkey"] == 0)[:20]] = 1.0
  r = paired_bootstrap(records(a), records(b), reps=500)
  assert r["n"] == 120 and np.isclose(r["diff"], 20 / 60 / 2)
  assert 0 < r["diff_ci95"][0] < r["diff"] < r["diff_ci95"][1]
  assert r["ratio_ci95"][0] > 1
  with pytest.raises(ValueError, match="same prompts"):
    paired_bootstrap(records(a), records(a)[1:])
