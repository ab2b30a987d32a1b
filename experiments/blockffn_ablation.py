"""The BlockFFN ablation: trains each method of configs/blockffn_ablation.py one after another,
evaluates it and writes one comparison.

  python -m experiments.blockffn_ablation --workdir=runs/blockffn_ablation \
      --out=experiments/results/blockffn_ablation        # all six, ~2 H100-minutes each
  python -m experiments.blockffn_ablation --size=cpu --out=/tmp/abl    # all six on 2 CPU cores, ~30 min
  python -m experiments.blockffn_ablation --size=tiny --methods=dense,blockffn --out=/tmp/abl   # seconds

Per method: validation loss, perplexity (per byte: the tokenizer is byte-level) and bits per
byte, and the FFN's activation sparsity on the validation batches: TLS, CLS_L for L in
(2, 4, ..., 64), the adjacent-token reuse ratio and the shares of experts never and always
active on a validation batch (sparsejax.ops.sparsity: without routing both are chunk-sparse).
Writes <out>.json ({"methods": {name: {"ppl", "bits_per_byte", "tls", "cls8", "cls": {L: value},
"reuse", "train_loss", ...}}}), <out>.md (a table) and <out>.png (CLS_L against L per method,
L = 1 being TLS, beside the training loss curves). A method whose run already finished in its
workdir is evaluated again without retraining.
"""
import json
import math
import os
import time

from absl import app, flags, logging

from configs import blockffn_ablation as ablation
from sparsejax.ops.sparsity import CLS_LENGTHS
from sparsejax.train.trainer import Trainer

_METHODS = flags.DEFINE_list("methods", list(ablation.ABLATION),
                             f"Methods, from {list(ablation.METHODS)}.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/blockffn_ablation",
                               "Each method trains in <workdir>/<method>.")
_OUT = flags.DEFINE_string("out", None, "Output path stem (default <workdir>/blockffn_ablation; "
                            "the recorded results are written only when asked for).")
_SIZE = flags.DEFINE_enum("size", "gpu", ["gpu", "cpu", "tiny"],
                          "gpu: the ablation's model (~2 H100-minutes a method); cpu: a smaller "
                          "one for two CPU cores; tiny: a few steps (tests).")
_STEPS = flags.DEFINE_integer("steps", None, "Override train.steps.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Override train.eval_batches.")
_MERGE = flags.DEFINE_list("merge", [], "Train nothing: join the methods of these result JSONs "
                           "(runs split over processes or GPU calls) into --out.")

# The paper's 0.1B numbers (TLS %, CLS8 %, PPL), for the table's reference row.
PAPER = {"dense": (None, None, 14.90), "topk_moe": (79.2, 49.2, 16.22),
         "remoe": (78.3, 42.4, 14.60), "blockffn": (80.5, 71.4, 14.88)}


def _clean(value):
  """NaN (nothing measured) -> None, so the JSON stays standard."""
  return None if isinstance(value, float) and math.isnan(value) else value


def _config_arg(method: str) -> str:
  return method if _SIZE.value == "gpu" else f"{method},{_SIZE.value}"


def run_method(method: str) -> dict:
  config = ablation.get_config(_config_arg(method))
  config.workdir = os.path.join(_WORKDIR.value, method)
  if _STEPS.value is not None:
    config.train.steps = _STEPS.value
  if _EVAL_BATCHES.value is not None:
    config.train.eval_batches = _EVAL_BATCHES.value
  trainer = Trainer(config, progress=_SIZE.value != "tiny")
  print(f"{method}: {trainer.num_params / 1e6:.2f}M parameters, ffn={config.model.ffn}, "
        f"workdir {os.path.abspath(config.workdir)}", flush=True)
  start = time.perf_counter()
  summary = trainer.train()
  train_seconds = time.perf_counter() - start
  ev = trainer.evaluate()
  coefs = {name: c.value for name, c in trainer.coefficients.controllers.items()}
  trainer.close()
  metric = lambda name: _clean(ev.get(f"metric/{name}"))
  result = {
      "ffn": config.model.ffn,
      "ffn_options": dict(config.model.ffn_options),
      "params": trainer.num_params,
      "loss": ev["loss"],
      "ppl": math.exp(ev["loss"]),
      "bits_per_byte": ev["bits_per_byte"],
      "tls": metric("tls"),
      "cls8": metric("cls8"),
      "cls": {str(length): metric(f"cls{length}") for length in CLS_LENGTHS},
      "reuse": metric("reuse"),
      "never_active": metric("never_active"),
      "always_active": metric("always_active"),
      "steps": summary["step"],
      "tokens": summary["step"] * config.train.batch_size * config.data.seq_len,
      "train_seconds": train_seconds if summary["step"] > summary["start_step"] else None,
      "tokens_per_s": summary.get("tokens_per_s"),
      "mfu": summary.get("mfu"),
      "final_coefficients": coefs,
      # The training loss at every log step: the end-point PPLs alone cannot tell a method that
      # learns slower from one that had not yet passed a sudden drop (e.g. in-context copying).
      "train_loss": [[h["step"], round(h["loss"], 4)] for h in summary.get("history", [])],
  }
  if "metric/neuron_sparsity" in ev:  # relu_dense: zero hidden units, not skippable experts
    result["neuron_sparsity"] = metric("neuron_sparsity")
  return result


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def markdown(results: dict, header: str) -> str:
  cls_cols = " | ".join(f"CLS{length}" for length in CLS_LENGTHS)
  lines = [header, "",
           f"| method | PPL | bits/byte | TLS % | {cls_cols} | reuse % | never % | always % | "
           "params | tokens/s |",
           "|---" * (9 + len(CLS_LENGTHS)) + "|"]
  for name, r in results.items():
    cls = " | ".join(_pct(r["cls"][str(length)]) for length in CLS_LENGTHS)
    tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
    lines.append(f"| {name} | {r['ppl']:.3f} | {r['bits_per_byte']:.4f} | {_pct(r['tls'])} | "
                 f"{cls} | {_pct(r['reuse'])} | {_pct(r.get('never_active'))} | "
                 f"{_pct(r.get('always_active'))} | {r['params'] / 1e6:.2f}M | {tps} |")
  lines += ["", "The paper at 0.1B (TLS % / CLS8 % / PPL, per BPE token): " + "; ".join(
      f"{name} {'-' if t is None else t} / {'-' if c is None else c} / {p}"
      for name, (t, c, p) in PAPER.items()) + "; without both losses BlockFFN's CLS8 falls to "
            "14.9%."]
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
  """Left: CLS_L against L per expert method. Right: the training loss curves (runs that
  recorded them)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, curves) = plt.subplots(1, 2, figsize=(12, 4.2))
  for name, r in results.items():
    if r["tls"] is None:
      continue  # dense kinds have no experts to skip
    lengths = [1] + list(CLS_LENGTHS)
    values = [r["tls"]] + [r["cls"][str(length)] for length in CLS_LENGTHS]
    points = [(x, 100 * y) for x, y in zip(lengths, values) if y is not None]
    ax.plot(*zip(*points), marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("chunk length L (tokens; L = 1 is TLS)")
  ax.set_ylabel("CLS_L: experts idle for the whole chunk (%)")
  ax.set_title("BlockFFN ablation: chunk-level sparsity")
  ax.grid(alpha=0.3)
  ax.legend()
  for name, r in results.items():
    if r.get("train_loss"):
      curves.plot(*zip(*r["train_loss"]), lw=1, label=name)
  curves.set_xlabel("step")
  curves.set_ylabel("training loss (nats per byte)")
  curves.set_title("training loss")
  curves.grid(alpha=0.3)
  if curves.lines:
    curves.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = [m for m in _METHODS.value if m not in ablation.METHODS]
  if unknown:
    raise ValueError(f"--methods: unknown {unknown}; known: {list(ablation.METHODS)}")
  if _MERGE.value:
    results, devices = {}, set()
    for path in _MERGE.value:
      with open(path) as f:
        part = json.load(f)
      results.update(part["methods"])
      devices.add(part["device"])
    if len(devices) != 1:
      raise ValueError(f"--merge: the parts ran on different devices {sorted(devices)}")
    results = {m: results[m] for m in ablation.METHODS if m in results}  # the paper's order
    device = devices.pop()
    write_outputs(results, device)
    print(markdown(results, _header(results, device)))
    return
  # Results are rewritten after every method, so a run cut short (a GPU call's time limit)
  # still leaves the methods it finished.
  results = {}
  for method in _METHODS.value:
    results[method] = run_method(method)
    write_outputs(results)
  print(markdown(results, _header(results)))


def _scale():
  first = ablation.get_config(_config_arg(_METHODS.value[0]))
  return {"d_model": first.model.d_model, "num_layers": first.model.num_layers,
          "seq_len": first.data.seq_len, "batch_size": first.train.batch_size,
          "steps": _STEPS.value or first.train.steps, "tokenizer": first.data.tokenizer,
          "size": _SIZE.value}


def _device() -> str:
  import jax
  return jax.devices()[0].device_kind


def _header(results, device=None):
  scale = _scale()
  return (f"# BlockFFN ablation ({device or _device()}; d_model {scale['d_model']}, "
          f"{scale['num_layers']} layers, {scale['steps']} steps of {scale['batch_size']} x "
          f"{scale['seq_len']} byte tokens)")


def write_outputs(results, device=None):
  import jax
  out = {"device": device or _device(), "jax": jax.__version__, "scale": _scale(),
         "paper_0.1b": {k: {"tls": t, "cls8": c, "ppl": p} for k, (t, c, p) in PAPER.items()},
         "methods": results}
  stem = _OUT.value or os.path.join(_WORKDIR.value, "blockffn_ablation")  # results/ when asked
  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(out, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(markdown(results, _header(results, device)))
  plot(results, stem + ".png")

if __name__ == "__main__":
  app.run(main)
