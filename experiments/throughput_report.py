"""Turns a pretraining run's summary into <out>.{json,md} (by default beside the run; the recorded
ones are experiments/results/pretrain_throughput.*):

  python -m experiments.throughput_report --workdir=runs/pretrain_100m \
      --command="python -m experiments.pretrain --config=configs/pretrain_100m.py"
"""
import csv
import json
import os

import jax
from absl import app, flags

from experiments.pretrain import _CONFIG  # noqa: F401  (reuses the --config flag)
from sparsejax.model import matmul_flops_per_token
from sparsejax.config import ModelConfig

_WORKDIR = flags.DEFINE_string("workdir", "runs/pretrain_100m", "The run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Output path stem (default <workdir>/pretrain_throughput; "
                            "the recorded results are written only when asked for).")
_COMMAND = flags.DEFINE_string("command", "", "The command that produced the run.")


def main(argv):
  del argv
  config = _CONFIG.value
  with open(os.path.join(_WORKDIR.value, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(_WORKDIR.value, "logs", "train_metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  if "tokens_per_s" not in summary:
    raise app.UsageError(
        f"{_WORKDIR.value}/summary.json has no tokens_per_s: the run timed no logging window (the "
        f"first window, which compiles, is left out), so train more than train.log_every steps")
  model_cfg = ModelConfig.from_dict(config.model)
  seq_len = config.data.seq_len
  result = {
      "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "params": summary["params"],
      "seq_len": seq_len,
      "global_batch": config.train.batch_size,
      "steps": summary["step"],
      "tokens_per_s": summary["tokens_per_s"],
      "mfu": summary.get("mfu"),
      "flops_per_token": matmul_flops_per_token(model_cfg, seq_len),
      "mfu_definition": "tokens/s x (6 x matmul params + 6 x layers x seq x heads x head_dim) / "
                        "(989 TFLOP/s dense bf16 x devices); timing excludes the first logging "
                        "window (compilation)",
      "first_loss": float(rows[0]["loss"]),
      "last_loss": float(rows[-1]["loss"]),
      "command": _COMMAND.value,
      "model": model_cfg.to_dict(),
  }
  out = _OUT.value or os.path.join(_WORKDIR.value, "pretrain_throughput")  # results/ when asked
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
  with open(out + ".md", "w") as f:
    f.write("# Pretraining throughput\n\n")
    f.write(f"Command: `{result['command']}`\n\n")
    f.write("| device | jax | params | seq_len | global batch | steps | tokens/s | MFU | loss first -> last |\n")
    f.write("|---|---|---|---|---|---|---|---|---|\n")
    f.write(f"| {result['device']} x{result['num_devices']} | {result['jax']} | "
            f"{result['params'] / 1e6:.1f}M | {seq_len} | {result['global_batch']} | "
            f"{result['steps']} | {result['tokens_per_s']:,.0f} | {mfu} | "
            f"{result['first_loss']:.3f} -> {result['last_loss']:.3f} |\n\n")
    f.write(f"MFU: {result['mfu_definition']}.\n")
  print(open(out + ".md").read())


if __name__ == "__main__":
  app.run(main)
