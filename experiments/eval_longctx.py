"""Long-context evaluation of a pretrained checkpoint: RULER-style tasks + long perplexity.

  python -m experiments.eval_longctx --workdir=runs/pretrain_100m --lengths=4096,8192,16384 \
      --method=infllmv2 --attention=infllmv2 --attention_options='{"dense_len": 0}' \
      --out=experiments/results/longctx_infllmv2

`--attention` / `--attention_options` swap the attention kind at eval time: every kind shares
the dense layer's parameters, so a checkpoint trained dense is evaluated dense, with InfLLM-V2
sparse attention, or with a sliding window (InfLLM-V2 keeping only its local blocks) without
retraining. Writes <out>.json / .md / heat-maps / plot and prints the table.

`--eviction_scorer=snapkv --eviction_compression=8` (or `--eviction_budget=`) generates under a
KV-cache eviction policy with chunked prefill; its other options are the `--eviction_*` flags of
experiments/eviction_flags.py. experiments.eviction_sweep runs every scorer x compression.
"""
import dataclasses
import json
import os
import time

from absl import app, flags, logging

from experiments import eviction_flags
from sparsejax.eval import TASKS, evaluate, long_perplexity, markdown_table, write_results
from sparsejax.eval.tasks import HAYSTACKS
from sparsejax.inference.eviction import EvictingGenerator
from sparsejax.inference.scorers import SCORERS
from sparsejax.model import with_config
from sparsejax.train.checkpoint import load_model

_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "The pretraining run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), f"Tasks, from {sorted(TASKS)}.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "Prompt lengths in tokens.")
_DEPTHS = flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Needle depths in [0, 1].")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Samples per (task, length, depth) cell.")
_HAYSTACK = flags.DEFINE_enum("haystack", "noise", list(HAYSTACKS), "Haystack text.")
_CORPUS = flags.DEFINE_string("corpus", "stdlib",
                              "Corpus whose validation split feeds haystacks and long perplexity.")
_OUT = flags.DEFINE_string("out", None, "Output path stem (default: under --workdir; "
                            "the recorded results are written only when asked for).")
_METHOD = flags.DEFINE_string("method", None, "Name stored in the JSON (default: attention kind).")
_ATTENTION = flags.DEFINE_string("attention", None, "Attention kind at eval time (default: the "
                                 "checkpoint's).")
_ATTENTION_OPTIONS = flags.DEFINE_string("attention_options", None,
                                         "JSON object of attention options (replaces the "
                                         "checkpoint's when given).")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", None, "Override the model's max_seq_len "
                                    "(RoPE has no table, so longer contexts than trained run).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per generation batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Sample seed.")
_PPL_LENGTHS = flags.DEFINE_list("ppl_lengths", None,
                                 "Long-perplexity lengths (default: --lengths; 'none' skips).")
_PPL_TAIL = flags.DEFINE_integer("ppl_tail", 256, "Scored tokens at the end of each document.")
_PPL_DOCS = flags.DEFINE_integer("ppl_docs", 4, "Documents per perplexity length.")
_PPL_CHUNK = flags.DEFINE_integer("ppl_chunk", None, "Feed perplexity documents through the KV "
                                  "cache in chunks of this many tokens (default: one pass).")
# KV-cache eviction (issue 6): generation under a scorer + budget; the policy's other options are
# the --eviction_* flags of experiments/eviction_flags.py. Long perplexity keeps the full cache.
_EVICTION_SCORER = flags.DEFINE_enum("eviction_scorer", None, sorted(SCORERS),
                                     "Generate with this KV-eviction scorer (default: full cache).")
_EVICTION_BUDGET = flags.DEFINE_integer("eviction_budget", None, "Entries kept per KV head.")
_EVICTION_COMPRESSION = flags.DEFINE_float("eviction_compression", None,
                                           "Or: budget = prompt length / this.")


def with_attention(model, attention: str | None, options_json: str | None,
                   max_seq_len: int | None):
  """The same parameters under another attention kind / options / max_seq_len."""
  changes = {}
  if attention:
    changes["attention"] = attention
  if options_json is not None:
    options = json.loads(options_json)
    if not isinstance(options, dict):
      raise ValueError(f"--attention_options must be a JSON object, got {options_json!r}")
    changes["attention_options"] = tuple(sorted(options.items()))
  if max_seq_len:
    changes["max_seq_len"] = max_seq_len
  return with_config(model, **changes)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  model, tok, meta = load_model(_WORKDIR.value, _STEP.value)
  model = with_attention(model, _ATTENTION.value, _ATTENTION_OPTIONS.value, _MAX_SEQ_LEN.value)
  lengths = [int(x) for x in _LENGTHS.value]
  depths = [float(x) for x in _DEPTHS.value]
  ppl_lengths = lengths if _PPL_LENGTHS.value is None else [
      int(x) for x in _PPL_LENGTHS.value if x.lower() != "none"]
  method = _METHOD.value or model.config.attention
  generate_fn = eviction = None
  if _EVICTION_SCORER.value:
    policy = eviction_flags.policy(_EVICTION_SCORER.value, budget=_EVICTION_BUDGET.value,
                                   compression=_EVICTION_COMPRESSION.value)
    heads = None
    if policy.scorer == "locret":
      heads, note = eviction_flags.load_heads(model)
      if heads is None:
        raise app.UsageError(f"--eviction_scorer=locret: {note}")
    generate_fn = EvictingGenerator(policy, heads)
    method = _METHOD.value or f"{model.config.attention}+{policy.scorer}"
    eviction = dataclasses.asdict(policy)
  start = time.time()
  results = evaluate(model, tok, _TASKS.value, lengths, depths, _SAMPLES.value, _SEED.value,
                     _MAX_NEW.value, _BATCH.value, haystack=_HAYSTACK.value, corpus=_CORPUS.value,
                     log=logging.info, generate_fn=generate_fn)
  if generate_fn is not None:
    eviction["peak_kv_bytes"] = generate_fn.peak_kv_bytes
  eval_s = time.time() - start
  long_ppl = long_perplexity(model, tok, ppl_lengths, _PPL_TAIL.value, _PPL_DOCS.value,
                             _SEED.value, corpus=_CORPUS.value,
                             chunk_size=_PPL_CHUNK.value) if ppl_lengths else {}
  results = {"method": method, "avg_score": results["avg_score"], "tasks": results["tasks"],
             "long_ppl": long_ppl,
             "config": {"workdir": _WORKDIR.value, "step": meta["step"],
                        "model": model.config.to_dict(), "tasks": _TASKS.value,
                        "lengths": lengths, "depths": depths, "samples": _SAMPLES.value,
                        "haystack": _HAYSTACK.value, "corpus": _CORPUS.value,
                        "max_new_tokens": _MAX_NEW.value, "seed": _SEED.value,
                        "ppl_tail": _PPL_TAIL.value, "ppl_docs": _PPL_DOCS.value,
                        "eviction": eviction,
                        "eval_seconds": round(eval_s, 1), "total_seconds":
                        round(time.time() - start, 1)},
             **{k: v for k, v in results.items() if k not in ("avg_score", "tasks")}}
  out = _OUT.value or os.path.join(_WORKDIR.value, "eval_longctx")  # results/ only when asked
  paths = write_results(results, out)
  print(f"{method}: checkpoint step {meta['step']} from {_WORKDIR.value}")
  print(markdown_table(results), end="")
  print("wrote " + ", ".join(paths))


if __name__ == "__main__":
  app.run(main)
