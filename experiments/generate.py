"""Loads a checkpoint written by experiments.pretrain and completes a prompt.

  python -m experiments.generate --workdir=runs/tiny --prompt="def " --max_new_tokens=200
"""
import jax
from absl import app, flags, logging

from sparsejax.inference import generate
from sparsejax.train.checkpoint import load_model

_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_PROMPT = flags.DEFINE_multi_string("prompt", ["def "], "Prompt(s); repeat the flag for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  model, tok, meta = load_model(_WORKDIR.value, _STEP.value)
  prompts = [[tok.bos_id] + tok.encode(p) for p in _PROMPT.value]
  outs = generate(model, prompts, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                  top_p=_TOP_P.value, rng=jax.random.key(_SEED.value), eos_id=tok.eos_id)
  print(f"checkpoint step {meta['step']} from {_WORKDIR.value}")
  for prompt, out in zip(_PROMPT.value, outs):
    print("-" * 60)
    print(prompt + tok.decode(out))


if __name__ == "__main__":
  app.run(main)
