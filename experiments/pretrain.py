"""Pretrains a decoder LM from a config.

  python -m experiments.pretrain --config=configs/tiny.py [--config.train.steps=100 ...]

Prints the validation loss before and after, saves checkpoints to <workdir>/checkpoints, logs
metrics to <workdir>/logs (CSV + TensorBoard) and writes <workdir>/summary.json.
"""
import json
import os

from absl import app, logging
from ml_collections import config_flags

from sparsejax.inference import generate
from sparsejax.train.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")


def main(argv):
  del argv
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)
  trainer = Trainer(config)
  print(f"model: {trainer.num_params / 1e6:.2f}M parameters, mesh {dict(trainer.mesh.shape)}, "
        f"workdir {os.path.abspath(config.workdir)}", flush=True)
  summary = trainer.train()
  trainer.close()
  for name in ("initial_eval", "final_eval"):
    if name in summary:
      ev = summary[name]
      print(f"{name.replace('_', ' ')}: loss {ev['loss']:.4f}, bits/byte {ev['bits_per_byte']:.4f}")
  if "tokens_per_s" in summary:
    mfu = f", MFU {summary['mfu']:.1%}" if "mfu" in summary else ""
    print(f"throughput: {summary['tokens_per_s']:,.0f} tokens/s{mfu}")
  with open(os.path.join(config.workdir, "summary.json"), "w") as f:
    json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
  if config.sample.max_new_tokens > 0:
    tok = trainer.tokenizer
    prompt = [tok.bos_id] + tok.encode(config.sample.prompt)
    new = generate(trainer.model(), [prompt], max_new_tokens=config.sample.max_new_tokens,
                   temperature=config.sample.temperature, top_p=config.sample.top_p,
                   eos_id=tok.eos_id)[0]
    print("sample:\n" + config.sample.prompt + tok.decode(new))


if __name__ == "__main__":
  app.run(main)
