"""Does InfLLM-V2's block selection find the needle? (sparsejax/eval/selection.py says what is
measured and why.)

  python -m experiments.selection_probe --workdir=runs/longctx_ablation_gpu/infllmv2 \
      --lengths=4096,16384 --depths=0,0.25,0.5,0.75 --samples=2 --tasks=passkey,multi_key \
      --out=experiments/results/selection_probe_infllmv2

Takes the task, length and model flags of experiments.eval_longctx (--attention /
--attention_options swap the attention of the forward pass). The selection settings are those of
an InfLLM-V2 checkpoint, or --sparse (a JSON object of InfLLMv2Config fields) for any other, e.g.
to ask what InfLLM-V2 would select from a dense model's q and k. Depth 1.0 puts the needle in the
local window, where it is forced, so the default depths stop short of it.

Writes <out>.json (per layer: the fraction of (prompt, query, KV head) cases whose needle block is
selected, that an oracle ranking blocks by the exact attention mass would select, the median
ranks, the mean attention mass on the needle block) and <out>.md, and prints the table.
"""
import dataclasses
import json
import os
import time

from absl import app, flags, logging

from experiments import eval_longctx
from sparsejax.eval.selection import run_probe, table_lines
from sparsejax.layers.infllmv2 import infllmv2_config
from sparsejax.ops.infllmv2 import InfLLMv2Config
from sparsejax.train.checkpoint import load_model

FLAGS = flags.FLAGS
_SPARSE = flags.DEFINE_string("sparse", None, "InfLLMv2Config fields as a JSON object (default: "
                              "the checkpoint's own, when its attention is infllmv2).")
_ANSWER_TOKENS = flags.DEFINE_integer("answer_tokens", None, "Queries probed per prompt: the last "
                                      "prompt token and the next answer_tokens - 1 (default: the "
                                      "whole answer).")
FLAGS.set_default("tasks", ["passkey", "multi_key"])
FLAGS.set_default("depths", ["0", "0.25", "0.5", "0.75"])
FLAGS.set_default("samples", 2)


def sparse_config(model) -> InfLLMv2Config:
  if _SPARSE.value is not None:
    fields = json.loads(_SPARSE.value)
    if not isinstance(fields, dict):
      raise app.UsageError(f"--sparse must be a JSON object, got {_SPARSE.value!r}")
    known = {f.name for f in dataclasses.fields(InfLLMv2Config)}
    if set(fields) - known:
      raise app.UsageError(f"--sparse: unknown fields {sorted(set(fields) - known)}; known: "
                           f"{sorted(known)}")
    return InfLLMv2Config(**fields)
  if model.config.attention != "infllmv2":
    raise app.UsageError(f"the checkpoint's attention is {model.config.attention!r}: pass --sparse "
                         "(the InfLLMv2Config to probe)")
  return infllmv2_config(model.config)


def markdown(report: dict) -> str:
  s = report["sparse"]
  lines = [f"# InfLLM-V2 selection probe: {report['workdir']}", "",
           f"Selection: blocks of {s['block_size']}, init {s['init_blocks']}, local "
           f"{s['local_blocks']}, top-k {s['topk']} ({report['free_slots']} chosen by score); "
           f"forward attention {report['model']['attention']}. {report['prompts']} prompts "
           f"(tasks {', '.join(report['tasks'])}; lengths {report['lengths']}; depths "
           f"{report['depths']}; {report['samples']} each), the last prompt token and the "
           "teacher-forced answer tokens as queries, every KV head.", "",
           ] + table_lines(report["layers"])
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  model, tok, meta = load_model(FLAGS.workdir, FLAGS.step)
  model = eval_longctx.with_attention(model, FLAGS.attention, FLAGS.attention_options,
                                      FLAGS.max_seq_len)
  cfg = sparse_config(model)
  lengths = [int(x) for x in FLAGS.lengths]
  depths = [float(x) for x in FLAGS.depths]
  start = time.time()
  probe = run_probe(model, tok, cfg, tasks=FLAGS.tasks, lengths=lengths, depths=depths,
                    samples=FLAGS.samples, seed=FLAGS.seed, haystack=FLAGS.haystack,
                    corpus=FLAGS.corpus, answer_tokens=_ANSWER_TOKENS.value)
  report = {"workdir": FLAGS.workdir, "step": meta["step"], "model": model.config.to_dict(),
            "sparse": dataclasses.asdict(cfg), "tasks": list(FLAGS.tasks), "lengths": lengths,
            "depths": depths, "samples": FLAGS.samples, "haystack": FLAGS.haystack,
            "seconds": round(time.time() - start, 1), **probe}
  out = FLAGS.out or os.path.join(FLAGS.workdir, "selection_probe")  # results/ only when asked
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as fh:
    json.dump(report, fh, indent=1)
  text = markdown(report)
  with open(out + ".md", "w") as fh:
    fh.write(text)
  print(text, end="")
  print(f"wrote {out}.json, {out}.md ({report['seconds']} s)")


if __name__ == "__main__":
  app.run(main)
