"""Locret's retaining heads (arXiv 2410.01805): per layer, a small MLP that scores each token's
KV entry from that token's own pre-RoPE projections, one score per KV head.

    score_t = W2 . silu(W1 . [q_t; k_t; v_t])        q_t of all query heads, k_t and v_t of all KV
                                                    heads, each flattened head-major

As in the reference (huangyuxiang03/Locret, `fc1` / `fc2` in its modeling_llama.py): no biases,
the backbone's hidden activation (SiLU: our SwiGLU FFN, like Llama-3 and Phi-3), hidden 1024. The
heads sit beside a frozen backbone and never touch its parameters; `sparsejax.train.locret`
trains them to predict the causal importance score of each KV entry, and the eviction cache keeps
the top-scored entries per KV head.

Saved as `retaining_heads.npz` (the two stacked weight arrays) + `retaining_heads.json` (the
backbone's ModelConfig, the hidden width, provenance): the heads only, never the backbone.
"""
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.config import ModelConfig
from sparsejax.layers.common import param

WEIGHTS_FILE = "retaining_heads.npz"
META_FILE = "retaining_heads.json"
FORMAT_VERSION = 1
ACTIVATION = "silu"
# ModelConfig fields that change how the backbone runs, not what its parameters are: heads trained
# on a checkpoint stay valid when these are overridden (a sparse attention kind at inference, a
# longer max_seq_len, another compute dtype), so the compatibility check ignores them.
RUNTIME_FIELDS = frozenset({"attention", "attention_options", "max_seq_len", "dtype", "remat",
                            "max_segments_per_row"})


def retaining_scores(q_pre: jax.Array, k_pre: jax.Array, v: jax.Array, w1: jax.Array,
                     w2: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
  """The heads' math for one layer.

  Args:
    q_pre: [b, t, heads, d] pre-RoPE queries.
    k_pre: [b, t, kv_heads, d] pre-RoPE keys.
    v: [b, t, kv_heads, d] values.
    w1: [(heads + 2 * kv_heads) * d, hidden].
    w2: [hidden, kv_heads].
    compute_dtype: the matmul input dtype (accumulation is float32).
  Returns:
    float32 [b, t, kv_heads]. Each token's scores depend on its own q, k, v only.
  """
  b, t = q_pre.shape[:2]
  x = jnp.concatenate([q_pre.reshape(b, t, -1), k_pre.reshape(b, t, -1), v.reshape(b, t, -1)],
                      axis=-1).astype(compute_dtype)
  h = jnp.einsum("bti,ih->bth", x, w1.astype(compute_dtype), preferred_element_type=jnp.float32)
  h = jax.nn.silu(h).astype(compute_dtype)
  return jnp.einsum("bth,hk->btk", h, w2.astype(compute_dtype),
                    preferred_element_type=jnp.float32)


def config_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
  """The parameter-defining ModelConfig fields (all but RUNTIME_FIELDS) that differ, as
  "field: saved -> current" strings; empty when the heads fit the backbone."""
  a, b = saved.to_dict(), current.to_dict()
  return [f"{k}: {a[k]!r} (heads) vs {b[k]!r} (backbone)"
          for k in sorted(a) if k not in RUNTIME_FIELDS and a[k] != b[k]]


class RetainingHeads(nnx.Module):
  """One retaining head per backbone layer; weights stacked over layers.

  `heads(layer, q_pre, k_pre, v)` scores the tokens of one layer: q_pre [b, t, heads, d], k_pre
  and v [b, t, kv_heads, d] (what `GroupedQueryAttention.project_qkv` returns) -> float32
  [b, t, kv_heads]. `layer` is a Python int (checked) or a traced int32 scalar.
  """

  def __init__(self, model_config: ModelConfig, hidden: int = 1024, *, rngs: nnx.Rngs):
    if not isinstance(model_config, ModelConfig):
      raise ValueError(f"RetainingHeads: model_config must be a ModelConfig, got "
                       f"{type(model_config).__name__}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
      raise ValueError(f"RetainingHeads: hidden must be a positive int, got hidden={hidden!r}")
    c = model_config
    in_dim = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    self.config = c
    self.hidden = hidden
    # Fan-in scaled like the reference's nn.Linear defaults, so first scores are O(1).
    self.w1 = param(rngs, (c.num_layers, in_dim, hidden), (None, None, "mlp"),
                    std=in_dim ** -0.5, dtype=c.params_dtype)
    self.w2 = param(rngs, (c.num_layers, hidden, c.num_kv_heads), (None, "mlp", "kv_heads"),
                    std=hidden ** -0.5, dtype=c.params_dtype)

  def __call__(self, layer, q_pre: jax.Array, k_pre: jax.Array, v: jax.Array) -> jax.Array:
    c = self.config
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
      if not 0 <= layer < c.num_layers:
        raise ValueError(f"RetainingHeads: layer must be in [0, {c.num_layers}), got {layer}")
    elif not (isinstance(layer, jax.Array) and layer.ndim == 0
              and jnp.issubdtype(layer.dtype, jnp.integer)):
      raise ValueError(f"RetainingHeads: layer must be an int or an int scalar array, got "
                       f"{layer!r}")
    want = {"q_pre": (c.num_heads, c.head_dim), "k_pre": (c.num_kv_heads, c.head_dim),
            "v": (c.num_kv_heads, c.head_dim)}
    for name, arr in (("q_pre", q_pre), ("k_pre", k_pre), ("v", v)):
      if arr.ndim != 4 or tuple(arr.shape[2:]) != want[name] or arr.shape[:2] != q_pre.shape[:2]:
        raise ValueError(
            f"RetainingHeads: {name} must be [batch, seq, {want[name][0]}, {want[name][1]}] with "
            f"the batch and seq of q_pre {tuple(q_pre.shape[:2])}, got shape {tuple(arr.shape)}")
    return retaining_scores(q_pre, k_pre, v, self.w1[...][layer], self.w2[...][layer],
                            c.compute_dtype)

  def check_backbone(self, model_config: ModelConfig) -> None:
    """Raises ValueError naming every parameter-defining field in which `model_config` differs
    from the backbone these heads were built for."""
    if not isinstance(model_config, ModelConfig):
      raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    diffs = config_differences(self.config, model_config)
    if diffs:
      raise ValueError("retaining heads were trained for another backbone; differing "
                       "ModelConfig fields: " + "; ".join(diffs))

  def num_params(self) -> int:
    return int(self.w1.size + self.w2.size)


def save_retaining_heads(heads: RetainingHeads, path: str, *,
                         meta: dict[str, Any] | None = None) -> str:
  """Writes the heads (never the backbone) to the directory `path`; returns `path`.

  `meta` (JSON-serialisable: the backbone's workdir and step, training steps, metrics) is stored
  next to the config for provenance.
  """
  if not isinstance(heads, RetainingHeads):
    raise ValueError(f"heads must be RetainingHeads, got {type(heads).__name__}")
  os.makedirs(path, exist_ok=True)
  info = {"format": FORMAT_VERSION, "model_config": heads.config.to_dict(),
          "hidden": heads.hidden, "activation": ACTIVATION, "meta": meta or {}}
  # Written to temporary names and renamed, so a reader never sees half a file.
  tmp = os.path.join(path, "tmp_" + WEIGHTS_FILE)
  with open(tmp, "wb") as f:
    np.savez(f, w1=np.asarray(heads.w1[...]), w2=np.asarray(heads.w2[...]))
  os.replace(tmp, os.path.join(path, WEIGHTS_FILE))
  tmp = os.path.join(path, "tmp_" + META_FILE)
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, os.path.join(path, META_FILE))
  return path


def load_retaining_heads(path: str, model_config: ModelConfig | None = None) -> RetainingHeads:
  """Loads heads written by `save_retaining_heads`.

  With `model_config` (the backbone they will run beside), raises ValueError naming every
  parameter-defining field that differs (runtime fields such as the attention kind or
  max_seq_len may differ). The loaded heads' `config` is the one saved with them.
  """
  weights, meta_path = os.path.join(path, WEIGHTS_FILE), os.path.join(path, META_FILE)
  for p in (weights, meta_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"load_retaining_heads: no {os.path.basename(p)} in {path}")
  with open(meta_path) as f:
    info = json.load(f)
  if info.get("format") != FORMAT_VERSION or info.get("activation") != ACTIVATION:
    raise ValueError(f"load_retaining_heads: {meta_path} has format {info.get('format')!r} and "
                     f"activation {info.get('activation')!r}; expected {FORMAT_VERSION} and "
                     f"{ACTIVATION!r}")
  config = ModelConfig.from_dict(info["model_config"])
  hidden = int(info["hidden"])
  abstract = nnx.eval_shape(lambda: RetainingHeads(config, hidden, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  with np.load(weights) as arrays:
    values = {"w1": arrays["w1"], "w2": arrays["w2"]}
  for name, value in values.items():
    want = getattr(abstract, name)
    if value.shape != want.shape:
      raise ValueError(f"load_retaining_heads: {name} in {weights} has shape {value.shape}, but "
                       f"its config asks for {want.shape}")
  pure = nnx.to_pure_dict(state)
  pure.update({k: jnp.asarray(v, dtype=config.params_dtype) for k, v in values.items()})
  heads = nnx.merge(graphdef, pure)
  if model_config is not None:
    heads.check_backbone(model_config)
  return heads
