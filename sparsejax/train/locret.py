"""Training Locret's retaining heads (arXiv 2410.01805): labels, loss, train step, held-out
metrics and the synthetic training examples.

Label (the causal importance score, CIS). For the KV entry of position j in layer l and KV head g:

    label[j, g] = max over answer positions p > j, over the query heads h of g's GQA group, of
                  q_p[h] . k_j[g] / sqrt(head_dim)

with q and k post-RoPE, as attention sees them (the frozen backbone's own projections, captured
pre-RoPE and rotated with the token positions), and p ranging over the answer tokens themselves
(not the last prompt token, whose query predicts the first answer token). This follows the
reference's data_gen.py: it runs the answer tokens over the cached prompt with eager attention
and keeps the pre-softmax weights `q k^T / sqrt(head_dim)` (modeling_llama.py, `attn_weights_`),
maxed over the answer queries and over the group (`reshape(.., kv_heads, group, ..).max(dim=2)`),
for the prompt positions only.

Which positions are in the loss: the context, j < answer_start, all of it (bos included) - the
reference trains the heads on the prompt alone (`input_ids[:prefix_len]`, labels for every one
of those positions). Positions inside the answer still get their causal label (the max over the
answer positions after them; 0 where none follows) but are left out of the loss, as are padding
positions (>= answer_end). Prompts and answers are right-padded to a static length; a causal
model's context does not see the padding.

Loss: SmoothL1(pred, label) (beta 1, torch's default) averaged over the (layer, batch, position,
KV head) entries in the loss, + 0.0025 x the smoothness term: per layer the mean of
(pred_j - pred_{j+1})^2 over pairs of consecutive positions both in the loss, SUMMED over layers
(the reference's train.py accumulates its per-layer MSE without averaging).

Examples (we have no LongAlign/LongAlpaca QA, so we generate): a `task_fraction` of them are the
RULER-style tasks of `sparsejax.eval.tasks` (task uniform over `tasks`, needle depth uniform in
[0, 1], haystack uniform over `haystacks`), the prompt followed by the gold answer
(" a, b, c."); the rest are plain long text from the TRAINING split of the corpus whose last
`answer_max_len` tokens are the "answer". Task seeds start at 2^40 (training) and 2^41
(held-out), far from the evaluation harness's `seed * 1_000_003 + i`, so no evaluation prompt is
trained on; the corpus text comes from the training split, which evaluation never reads.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsejax.config import comma_list
from sparsejax.data.corpus import read_text, resolve_corpus
from sparsejax.eval.tasks import HAYSTACKS, TASKS, answer_text, make_sample
from sparsejax.layers.retaining_heads import RetainingHeads
from sparsejax.model import backbone_qkv
from sparsejax.ops.rope import apply_rope

SMOOTH_WEIGHT = 0.0025
SPLITS = ("train", "heldout")
_TASK_SEED_BASE = {"train": 2 ** 40, "heldout": 2 ** 41}
_SPLIT_SALT = {"train": 0x10C, "heldout": 0x2E7}
_MAX_INDEX = 2 ** 24   # examples per split and seed (task seeds stay disjoint below this)
_MAX_SEED = 2 ** 15


# ---------------------------------------------------------------------------------------------
# Labels.

def importance_labels(q_pre: jax.Array, k_pre: jax.Array, positions: jax.Array,
                      answer_start: jax.Array, answer_end: jax.Array, *, rope_base: float,
                      answer_max_len: int) -> tuple[jax.Array, jax.Array]:
  """Causal importance scores of one layer (see the module docstring).

  Args:
    q_pre: [b, t, heads, d] pre-RoPE queries; k_pre: [b, t, kv_heads, d] pre-RoPE keys.
    positions: [b, t] RoPE positions of the tokens.
    answer_start, answer_end: [b] int; row i's answer occupies [answer_start, answer_end).
    rope_base: the backbone's RoPE base.
    answer_max_len: static bound on answer_end - answer_start (longer answers are cut).
  Returns:
    (labels float32 [b, t, kv_heads], has_label bool [b, t]): has_label[j] says some answer
    position p > j exists; labels are 0 where it does not. Memory: the logits of the answer
    queries against all keys, [b, heads, answer_max_len, t], nothing quadratic in t.
  """
  if q_pre.ndim != 4 or k_pre.ndim != 4 or k_pre.shape[:2] != q_pre.shape[:2] \
      or k_pre.shape[3] != q_pre.shape[3] or q_pre.shape[2] % k_pre.shape[2]:
    raise ValueError(f"importance_labels: q_pre must be [b, t, heads, d] and k_pre [b, t, "
                     f"kv_heads, d] with kv_heads dividing heads; got {q_pre.shape} and "
                     f"{k_pre.shape}")
  b, t, num_heads, d = q_pre.shape
  kv_heads = k_pre.shape[2]
  if positions.shape != (b, t):
    raise ValueError(f"importance_labels: positions must be [{b}, {t}], got {positions.shape}")
  for name, arr in (("answer_start", answer_start), ("answer_end", answer_end)):
    if arr.shape != (b,):
      raise ValueError(f"importance_labels: {name} must be [{b}], got shape {arr.shape}")
  if isinstance(answer_max_len, bool) or not isinstance(answer_max_len, int) \
      or answer_max_len < 1:
    raise ValueError(f"importance_labels: answer_max_len must be a positive int, got "
                     f"{answer_max_len!r}")
  # Rotated in the captured dtype (what attention multiplies), then multiplied in float32.
  q = apply_rope(q_pre, positions, rope_base)
  k = apply_rope(k_pre, positions, rope_base)
  idx = answer_start[:, None] + jnp.arange(answer_max_len)[None, :]        # [b, A]
  in_answer = (idx < answer_end[:, None]) & (idx < t)
  idx = jnp.clip(idx, 0, t - 1)
  qa = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)                 # [b, A, heads, d]
  qa = qa.reshape(b, answer_max_len, kv_heads, num_heads // kv_heads, d)
  logits = jnp.einsum("bagkd,btgd->bgkat", qa.astype(jnp.float32), k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)  # [b, K, G, A, t]
  later = in_answer[:, :, None] & (idx[:, :, None] > jnp.arange(t)[None, None, :])  # [b, A, t]
  logits = jnp.where(later[:, None, None], logits, -jnp.inf)
  labels = jnp.max(logits, axis=(2, 3))                                      # [b, K, t]
  has_label = jnp.any(later, axis=1)
  labels = jnp.where(has_label[:, None, :], labels, 0.0)
  return jnp.transpose(labels, (0, 2, 1)), has_label


def loss_mask(answer_start: jax.Array, seq_len: int) -> jax.Array:
  """bool [b, seq_len]: the context positions j < answer_start, the positions in the loss."""
  return jnp.arange(seq_len)[None, :] < answer_start[:, None]


def backbone_targets(model, batch: dict[str, jax.Array], answer_max_len: int):
  """One frozen forward pass -> (per-layer pre-RoPE qkv, labels [layers, b, t, kv_heads], the
  loss mask [b, t]). `batch` holds "tokens" [b, t], "answer_start" and "answer_end" [b]."""
  tokens = batch["tokens"]
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  qkv = backbone_qkv(model, tokens, positions)
  per_layer = [importance_labels(q, k, positions, batch["answer_start"], batch["answer_end"],
                                 rope_base=model.config.rope_base, answer_max_len=answer_max_len)
               for q, k, _ in qkv]
  labels = jnp.stack([lab for lab, _ in per_layer])
  # has_label is the same in every layer; it drops rows whose answer is empty.
  mask = loss_mask(batch["answer_start"], t) & per_layer[0][1]
  return qkv, labels, mask


def head_predictions(heads: RetainingHeads, qkv) -> jax.Array:
  """float32 [layers, b, t, kv_heads]: the heads' scores of every layer."""
  return jnp.stack([heads(i, q, k, v) for i, (q, k, v) in enumerate(qkv)])


# ---------------------------------------------------------------------------------------------
# Loss.

def retaining_loss(preds: jax.Array, labels: jax.Array, mask: jax.Array,
                   smooth_weight: float = SMOOTH_WEIGHT) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Locret's loss (see the module docstring).

  Args:
    preds, labels: [layers, b, t, kv_heads] float.
    mask: [b, t] bool, the positions in the loss.
    smooth_weight: weight of the smoothness term.
  Returns:
    (scalar loss, {"fit_loss": SmoothL1 mean, "smooth_loss": the unweighted smoothness term}).
  """
  if preds.ndim != 4 or preds.shape != labels.shape:
    raise ValueError(f"retaining_loss: preds and labels must both be [layers, b, t, kv_heads], "
                     f"got {preds.shape} and {labels.shape}")
  if mask.shape != preds.shape[1:3]:
    raise ValueError(f"retaining_loss: mask must be [b, t] = {preds.shape[1:3]}, got {mask.shape}")
  layers, kv_heads = preds.shape[0], preds.shape[3]
  preds, labels = preds.astype(jnp.float32), labels.astype(jnp.float32)
  m = mask.astype(jnp.float32)
  err = preds - labels
  smooth_l1 = jnp.where(jnp.abs(err) < 1.0, 0.5 * err * err, jnp.abs(err) - 0.5)
  fit = jnp.sum(smooth_l1 * m[None, :, :, None]) / jnp.maximum(jnp.sum(m) * layers * kv_heads, 1.)
  pairs = m[:, 1:] * m[:, :-1]
  step = preds[:, :, 1:] - preds[:, :, :-1]
  per_layer = jnp.sum(step * step * pairs[None, :, :, None], axis=(1, 2, 3))
  smooth = jnp.sum(per_layer) / jnp.maximum(jnp.sum(pairs) * kv_heads, 1.0)
  return fit + smooth_weight * smooth, {"fit_loss": fit, "smooth_loss": smooth}


# ---------------------------------------------------------------------------------------------
# Jitted steps.

def make_train_step(backbone_graphdef, heads_graphdef, tx: optax.GradientTransformation, *,
                    answer_max_len: int, smooth_weight: float = SMOOTH_WEIGHT):
  """A jitted `step(head_params, opt_state, backbone_state, batch) -> (head_params, opt_state,
  metrics)`. Only the heads' parameters (a pure dict) are differentiated and updated; the
  backbone's state is an input, never an output, and its activations carry stop_gradient.
  head_params and opt_state are donated."""

  def step(head_params, opt_state, backbone_state, batch):
    backbone = nnx.merge(backbone_graphdef, backbone_state)
    qkv, labels, mask = backbone_targets(backbone, batch, answer_max_len)

    def loss_fn(params):
      preds = head_predictions(nnx.merge(heads_graphdef, params), qkv)
      return retaining_loss(preds, labels, mask, smooth_weight)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(head_params)
    updates, opt_state = tx.update(grads, opt_state, head_params)
    head_params = optax.apply_updates(head_params, updates)
    m = mask.astype(jnp.float32)[None, :, :, None]
    count = jnp.maximum(jnp.sum(m) * labels.shape[0] * labels.shape[3], 1.0)
    label_mean = jnp.sum(labels * m) / count
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
               "label_mean": label_mean,
               "label_std": jnp.sqrt(jnp.sum((labels - label_mean) ** 2 * m) / count)}
    return head_params, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def make_predict_fn(backbone_graphdef, heads_graphdef, *, answer_max_len: int):
  """A jitted `predict(head_params, backbone_state, batch) -> (preds, labels [layers, b, t,
  kv_heads], mask [b, t])` for held-out evaluation."""

  def predict(head_params, backbone_state, batch):
    qkv, labels, mask = backbone_targets(nnx.merge(backbone_graphdef, backbone_state), batch,
                                         answer_max_len)
    return head_predictions(nnx.merge(heads_graphdef, head_params), qkv), labels, mask

  return jax.jit(predict)


# ---------------------------------------------------------------------------------------------
# Held-out metrics (host side).

def _ranks(x: np.ndarray) -> np.ndarray:
  r = np.empty(len(x), np.float64)
  r[np.argsort(x, kind="stable")] = np.arange(len(x))
  return r


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  den = np.sqrt(np.sum(a * a) * np.sum(b * b))
  return float(np.sum(a * b) / den) if den > 0 else 0.0


def score_metrics(preds: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                  fraction: float = 0.1) -> dict[str, float]:
  """How well predicted scores rank the KV entries, per (example, layer, KV head), averaged.

  Args:
    preds, labels: [layers, b, t, kv_heads]; mask: [b, t] bool (positions scored).
    fraction: the kept fraction k/n (the reference's training log uses 0.1).
  Returns:
    {"recall": |top-k by pred & top-k by label| / k (the fraction of the truly important entries
    that a top-k eviction by these scores keeps; random scores get "chance" = k/n on average),
    "chance", "spearman" and "pearson" (rank and linear correlation with the labels)}.
  """
  preds, labels, mask = np.asarray(preds), np.asarray(labels), np.asarray(mask, bool)
  if preds.ndim != 4 or preds.shape != labels.shape or mask.shape != preds.shape[1:3]:
    raise ValueError(f"score_metrics: preds and labels must be [layers, b, t, kv_heads] and mask "
                     f"[b, t]; got {preds.shape}, {labels.shape}, {mask.shape}")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"score_metrics: fraction must be in (0, 1], got {fraction!r}")
  out: dict[str, list[float]] = {"recall": [], "chance": [], "spearman": [], "pearson": []}
  for i in range(preds.shape[1]):
    n = int(mask[i].sum())
    if n < 2:
      continue
    k = max(1, math.ceil(fraction * n))
    for layer in range(preds.shape[0]):
      for h in range(preds.shape[3]):
        p, y = preds[layer, i, mask[i], h], labels[layer, i, mask[i], h]
        top_p = np.argpartition(-p, k - 1)[:k]
        top_y = np.argpartition(-y, k - 1)[:k]
        out["recall"].append(len(np.intersect1d(top_p, top_y)) / k)
        out["chance"].append(k / n)
        out["spearman"].append(_pearson(_ranks(p), _ranks(y)))
        out["pearson"].append(_pearson(p.astype(np.float64), y.astype(np.float64)))
  if not out["recall"]:
    raise ValueError("score_metrics: no example has two or more scored positions")
  return {name: float(np.mean(v)) for name, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Training examples.

@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  """What the training examples look like (module docstring). Sequence-valued fields accept a
  comma-separated string, as config overrides give them; `tasks="all"` means every task."""
  lengths: tuple[int, ...] = (4096,)   # total tokens per example (bos + prompt + answer + pad)
  answer_max_len: int = 128
  task_fraction: float = 0.5
  tasks: tuple[str, ...] = tuple(TASKS)
  haystacks: tuple[str, ...] = ("noise",)
  corpus: str = "stdlib"
  validation_fraction: float = 0.02
  seed: int = 0

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("lengths", comma_list(self.lengths, int, "lengths"))
    tasks = tuple(TASKS) if self.tasks in ("all", ("all",)) \
        else comma_list(self.tasks, str, "tasks")
    set_("tasks", tasks)
    set_("haystacks", comma_list(self.haystacks, str, "haystacks"))
    if not self.lengths or min(self.lengths) < 1:
      raise ValueError(f"lengths must be positive ints, got lengths={self.lengths!r}")
    if isinstance(self.answer_max_len, bool) or not isinstance(self.answer_max_len, int) \
        or self.answer_max_len < 1:
      raise ValueError(f"answer_max_len must be a positive int, got {self.answer_max_len!r}")
    if min(self.lengths) < 2 * self.answer_max_len:
      raise ValueError(f"every length must be at least 2 * answer_max_len = "
                       f"{2 * self.answer_max_len} so a context precedes the answer; got "
                       f"lengths={self.lengths}")
    if not 0.0 <= float(self.task_fraction) <= 1.0:
      raise ValueError(f"task_fraction must be in [0, 1], got {self.task_fraction!r}")
    unknown = sorted(set(self.tasks) - set(TASKS))
    if unknown or not self.tasks:
      raise ValueError(f"tasks must name some of {sorted(TASKS)} (or be 'all'), got "
                       f"{self.tasks!r}")
    if not self.haystacks or set(self.haystacks) - set(HAYSTACKS):
      raise ValueError(f"haystacks must name some of {HAYSTACKS}, got {self.haystacks!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
        or not 0 <= self.seed < _MAX_SEED:
      raise ValueError(f"seed must be an int in [0, {_MAX_SEED}), got {self.seed!r}")


class ExampleSource:
  """Deterministic training and held-out batches: `batch(split, index, batch_size)` is a pure
  function of its arguments and the config, so a resumed run continues with exactly the batches
  it would have seen (the data state is the next batch index)."""

  def __init__(self, tokenizer, config: ExampleConfig):
    self.tokenizer = tokenizer
    self.config = config
    self._files: list[str] | None = None
    self._encoded: dict[int, np.ndarray] = {}
    # BPE prompts land within a few tokens of the requested length; leave room for that.
    self._slack = 0 if getattr(tokenizer, "kind", None) == "byte" else 16

  def batch(self, split: str, index: int, batch_size: int = 1) -> dict[str, np.ndarray]:
    """{"tokens" int32 [b, L] (right-padded with pad_id), "answer_start", "answer_end" int32
    [b], "is_task" bool [b]}; L is drawn from config.lengths once per batch."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not 0 <= index * batch_size < _MAX_INDEX:
      raise ValueError(f"index must be in [0, {_MAX_INDEX // batch_size}), got {index}")
    c = self.config
    rng = np.random.default_rng([c.seed, _SPLIT_SALT[split], index])
    length = int(c.lengths[rng.integers(len(c.lengths))])
    rows = [self.example(split, index * batch_size + i, length) for i in range(batch_size)]
    return {"tokens": np.stack([r["tokens"] for r in rows]),
            **{k: np.asarray([r[k] for r in rows], np.int32)
               for k in ("answer_start", "answer_end")},
            "is_task": np.asarray([r["is_task"] for r in rows], bool)}

  def example(self, split: str, index: int, length: int) -> dict:
    """One example of exactly `length` tokens (padded): {"tokens", "answer_start",
    "answer_end", "is_task", "task"}."""
    c, tok = self.config, self.tokenizer
    rng = np.random.default_rng([c.seed, _SPLIT_SALT[split], index, 1])
    if rng.uniform() < c.task_fraction:
      task = c.tasks[int(rng.integers(len(c.tasks)))]
      haystack = c.haystacks[int(rng.integers(len(c.haystacks)))]
      sample = make_sample(task, tok, length - 1 - c.answer_max_len - self._slack,
                           depth=float(rng.uniform()),
                           seed=_TASK_SEED_BASE[split] + (c.seed << 24) + index,
                           haystack=haystack, corpus=c.corpus, text_split="train")
      context = [tok.bos_id] + tok.encode(sample.prompt)
      answer = tok.encode(answer_text(sample))[:c.answer_max_len]
    else:
      task = "text"
      ids = self._train_text(rng, length - 1)
      context, answer = [tok.bos_id] + ids[:-c.answer_max_len], ids[-c.answer_max_len:]
    ids = context + answer
    if len(ids) > length:
      raise ValueError(f"a {task} example took {len(ids)} tokens, more than length={length} "
                       "(a tokenizer merging far across pieces); raise answer_max_len")
    tokens = np.full((length,), tok.pad_id, np.int32)
    tokens[:len(ids)] = ids
    return {"tokens": tokens, "answer_start": len(context), "answer_end": len(ids),
            "is_task": task != "text", "task": task}

  def _train_text(self, rng: np.random.Generator, n: int) -> list[int]:
    """n tokens of consecutive training-split files from a random one, wrapping around."""
    if self._files is None:
      self._files = sorted(resolve_corpus(self.config.corpus, "train",
                                          self.config.validation_fraction))
      if not self._files:
        raise ValueError(f"corpus={self.config.corpus!r} has no training files")
    start = int(rng.integers(len(self._files)))
    ids: list[int] = []
    for i in range(len(self._files)):
      j = (start + i) % len(self._files)
      if j not in self._encoded:
        text = read_text(self._files[j]).rstrip("\n") + "\n\n"
        self._encoded[j] = np.asarray(self.tokenizer.encode(text), np.int32)
      ids.extend(self._encoded[j][:n - len(ids)].tolist())
      if len(ids) == n:
        return ids
    raise ValueError(f"the training split of corpus={self.config.corpus!r} holds fewer than {n} "
                     "tokens")
