"""PPL-p% activation sparsity (Sparsing Law, arXiv 2411.02335) of a trained run's FFN neurons.

  python -m experiments.ppl_sparsity --workdir=runs/blockffn_ablation/relu_dense --p=1 \
      --out=experiments/results/ppl_sparsity_relu_dense

Every FFN kind is read as one layer of neurons (`hidden_units(x)` -> hidden h [.., H] and
w_out [H, d], output = h @ w_out; for expert FFNs the neurons are the E*w gated expert units).
Neuron i adds n_i = h_i * w_out[i] to a token's output. A token drops the neurons with
||n_i|| <= eps, and CETT(eps) = ||sum of dropped n_i|| / ||sum of all n_i|| (the relative
output error), averaged over the calibration tokens. For a shared value c, each layer's eps is
bisected so that its mean CETT is c (on the unpruned model's activations of the calibration
tokens); c itself is bisected until the perplexity on the validation batches is (1 + p/100)
times the unpruned one. PPL-p% sparsity = the fraction of (real token, neuron) pairs dropped at
that c, averaged over layers (exact zeros, as ReLU makes, count as dropped). Writes <out>.json
(the search trace too) and <out>.md.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from sparsejax.data import DataConfig, make_eval_batches
from sparsejax.train.checkpoint import load_model
from sparsejax.train.loss import lm_loss_sums
from sparsejax.train.trainer import token_bytes_table

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_P = flags.DEFINE_float("p", 1.0, "Allowed perplexity increase, in percent.")
_CORPUS = flags.DEFINE_string("corpus", "stdlib", "Corpus whose validation split is used.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per row (capped at max_seq_len).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per batch.")
_BATCHES = flags.DEFINE_integer("eval_batches", 4, "Validation batches for the perplexity.")
_CALIBRATION = flags.DEFINE_integer("calibration_tokens", 4096,
                                    "Real tokens whose activations set each layer's eps.")
_C_ITERS = flags.DEFINE_integer("c_iters", 12, "Bisection steps on the shared CETT.")
_OUT = flags.DEFINE_string("out", None, "Output path stem (default: <workdir>/ppl_sparsity).")


class Threshold(nnx.Variable):
  """A layer's eps: state, not structure, so new values do not recompile."""


class PrunedFFN(nnx.Module):
  """Wraps an FFN: drops, per token, the neurons whose contribution norm is <= eps."""

  def __init__(self, inner: nnx.Module):
    if not hasattr(inner, "hidden_units"):
      raise ValueError(f"PPL-p% sparsity needs the FFN's hidden_units(x); "
                       f"{type(inner).__name__} has none")
    self.inner = inner
    self.eps = Threshold(jnp.zeros((), jnp.float32))
    self.capture = False  # when True, sow (hidden, w_out) for calibration

  def __call__(self, x, *, segment_ids=None):
    hidden, w_out = self.inner.hidden_units(x)
    if self.capture:
      self.sow(nnx.Intermediate, "hidden", hidden.astype(jnp.float32))
      self.sow(nnx.Intermediate, "w_out", w_out.astype(jnp.float32))
    dropped = contributions(hidden, w_out) <= self.eps[...]
    seg = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    real = seg != 0
    fraction = jnp.mean(dropped, axis=-1, dtype=jnp.float32)
    metric = jnp.sum(jnp.where(real, fraction, 0.0)) / jnp.maximum(jnp.sum(real), 1)
    return jnp.where(dropped, 0, hidden) @ w_out, {"metric/dropped": metric}


def contributions(hidden: jax.Array, w_out: jax.Array) -> jax.Array:
  """||n_i|| = |h_i| * ||w_out[i]||: hidden [..., H], w_out [H, d] -> [..., H] float32."""
  norms = jnp.linalg.norm(w_out.astype(jnp.float32), axis=-1)
  return jnp.abs(hidden.astype(jnp.float32)) * norms


@jax.jit
def cett(hidden: jax.Array, w_out: jax.Array, eps: jax.Array) -> jax.Array:
  """Mean over tokens of ||dropped part of the output|| / ||output||; hidden [T, H] float32."""
  dropped = contributions(hidden, w_out) <= eps
  full = hidden @ w_out
  tail = jnp.where(dropped, hidden, 0.0) @ w_out
  ratio = jnp.linalg.norm(tail, axis=-1) / jnp.maximum(jnp.linalg.norm(full, axis=-1), 1e-30)
  return jnp.mean(ratio)


def eps_for_cett(hidden, w_out, target: float, iters: int = 40) -> float:
  """The eps whose mean CETT is `target` (bisection on [0, max contribution])."""
  lo, hi = 0.0, float(jnp.max(contributions(hidden, w_out)))
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    if float(cett(hidden, w_out, jnp.float32(mid))) <= target:
      lo = mid
    else:
      hi = mid
  return lo


def prune(model) -> list[PrunedFFN]:
  """Wraps every block's FFN in place; returns the wrappers."""
  wrappers = []
  for block in model.blocks:
    block.ffn = PrunedFFN(block.ffn)
    wrappers.append(block.ffn)
  return wrappers


@nnx.jit
def _batch_sums(model, batch, token_bytes):
  logits, aux, _ = model(batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
  sums = lm_loss_sums(logits, batch["targets"], batch["loss_mask"], token_bytes)
  return sums, aux["metric/dropped"]


def evaluate(model, batches, token_bytes) -> dict[str, float]:
  """Perplexity, bits per byte and the dropped fraction over the batches."""
  nll = tokens = nbytes = dropped = 0.0
  for batch in batches:
    sums, frac = _batch_sums(model, {k: jnp.asarray(v) for k, v in batch.items()}, token_bytes)
    nll, tokens = nll + float(sums["nll"]), tokens + float(sums["tokens"])
    nbytes, dropped = nbytes + float(sums["bytes"]), dropped + float(frac)
  return {"ppl": math.exp(nll / max(tokens, 1.0)),
          "bits_per_byte": nll / math.log(2) / max(nbytes, 1.0),
          "sparsity": dropped / len(batches)}


def calibration(model, wrappers, batch, tokens: int) -> list[tuple[jax.Array, jax.Array]]:
  """(hidden [T, H], w_out [H, d]) per layer for the first `tokens` real tokens of `batch`,
  from the unpruned model."""
  for w in wrappers:
    w.capture = True

  @nnx.jit
  def forward(m, b):
    _, captured = nnx.capture(m, nnx.Intermediate)(
        b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])
    return captured

  try:
    captured = nnx.to_pure_dict(forward(model, {k: jnp.asarray(v) for k, v in batch.items()}))
  finally:
    for w in wrappers:
      w.capture = False
  real = np.asarray(batch["segment_ids"]).reshape(-1) != 0
  layers = []
  for i in range(len(wrappers)):
    ffn = captured["blocks"][i]["ffn"]
    (hidden,), (w_out,) = ffn["hidden"], ffn["w_out"]  # sow keeps a tuple of the values
    hidden = np.asarray(hidden).reshape(real.size, -1)[real][:tokens]
    layers.append((jnp.asarray(hidden), w_out))
  return layers


def ppl_sparsity(model, batches, token_bytes, *, p: float = 1.0, calibration_tokens: int = 4096,
                 c_iters: int = 12) -> dict:
  """Runs the search on `model` (its FFNs get wrapped in place). Returns the result dict."""
  if not p > 0:
    raise ValueError(f"p must be > 0 (percent), got {p!r}")
  if not batches:
    raise ValueError("batches must hold at least one validation batch")
  wrappers = prune(model)
  layers = calibration(model, wrappers, batches[0], calibration_tokens)

  def at(c: float) -> dict:
    eps = [eps_for_cett(h, w, c) if c > 0 else 0.0 for h, w in layers]
    for wrapper, value in zip(wrappers, eps):
      wrapper.eps[...] = jnp.float32(value)
    return {"cett": c, "eps": eps, **evaluate(model, batches, token_bytes)}

  base = at(0.0)
  target = base["ppl"] * (1 + p / 100)
  trace = [base]
  lo, hi = base, at(1.0)
  trace.append(hi)
  if hi["ppl"] <= target:  # even dropping everything passes: nothing to search
    lo = hi
  else:
    for _ in range(c_iters):
      mid = at(0.5 * (lo["cett"] + hi["cett"]))
      trace.append(mid)
      lo, hi = (mid, hi) if mid["ppl"] <= target else (lo, mid)
  return {"p": p, "base_ppl": base["ppl"], "target_ppl": target, "cett": lo["cett"],
          "ppl": lo["ppl"], "sparsity": lo["sparsity"], "activation_ratio": 1 - lo["sparsity"],
          "eps": lo["eps"], "exact_zero_fraction": base["sparsity"], "trace": trace}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  model, tokenizer, meta = load_model(_WORKDIR.value, _STEP.value)
  config = model.config
  data = DataConfig(source=_CORPUS.value, seq_len=min(_SEQ_LEN.value, config.max_seq_len),
                    batch_size=_BATCH.value, max_segments_per_row=config.max_segments_per_row)
  batches = make_eval_batches(data, tokenizer, _BATCHES.value)
  token_bytes = jnp.asarray(token_bytes_table(tokenizer, config.vocab_size))
  result = ppl_sparsity(model, batches, token_bytes, p=_P.value,
                        calibration_tokens=_CALIBRATION.value, c_iters=_C_ITERS.value)
  result.update(workdir=os.path.abspath(_WORKDIR.value), step=meta["step"], ffn=config.ffn,
                device=jax.devices()[0].device_kind,
                tokens=len(batches) * data.batch_size * data.seq_len)
  out = _OUT.value or os.path.join(_WORKDIR.value, "ppl_sparsity")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  table = (f"# PPL-{_P.value:g}% sparsity of {_WORKDIR.value} (ffn={config.ffn}, step "
           f"{meta['step']})\n\n| base PPL | target PPL | CETT | PPL | sparsity % | "
           f"activation ratio % | exact zeros % |\n|---|---|---|---|---|---|---|\n"
           f"| {result['base_ppl']:.3f} | {result['target_ppl']:.3f} | {result['cett']:.4f} | "
           f"{result['ppl']:.3f} | {100 * result['sparsity']:.1f} | "
           f"{100 * result['activation_ratio']:.1f} | "
           f"{100 * result['exact_zero_fraction']:.1f} |\n")
  with open(out + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
