"""The model's configuration: one frozen dataclass, built from the experiment's ConfigDict; and
`comma_list`, how list-valued config fields are read (command-line overrides give strings)."""
import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the decoder LM.

  `attention` and `ffn` name entries of the registries in `sparsejax.layers`; their own
  hyperparameters travel in `attention_options` / `ffn_options` so new kinds plug in without
  new fields here.
  """
  vocab_size: int = 512
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  ffn_hidden: int = 768
  max_seq_len: int = 4096
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  attention: str = "dense"
  attention_options: tuple[tuple[str, Any], ...] = ()
  ffn: str = "swiglu"
  ffn_options: tuple[tuple[str, Any], ...] = ()
  dtype: str = "bfloat16"        # compute dtype
  param_dtype: str = "float32"
  init_std: float = 0.02
  remat: bool = False            # recompute each block's activations in the backward pass
  max_segments_per_row: int = 64  # static bound for the cuDNN packed-attention path

  def __post_init__(self):
    positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "ffn_hidden", "max_seq_len", "max_segments_per_row")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"ModelConfig.{name} must be 'float32', 'bfloat16' or 'float16', got {getattr(self, name)!r}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def attention_kwargs(self) -> dict[str, Any]:
    return dict(self.attention_options)

  def ffn_kwargs(self) -> dict[str, Any]:
    return dict(self.ffn_options)

  @classmethod
  def from_dict(cls, d) -> "ModelConfig":
    """Builds from a mapping (an ml_collections ConfigDict works); unknown keys are errors."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"ModelConfig: unknown fields {unknown}; known fields are {sorted(known)}")
    for name in ("attention_options", "ffn_options"):
      if name in d:
        d[name] = tuple(sorted(dict(d[name]).items()))
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["attention_options"] = dict(self.attention_options)
    d["ffn_options"] = dict(self.ffn_options)
    return d


def comma_list(value, kind, name: str) -> tuple:
  """A config field given as a comma-separated string ("a, b") or as a sequence, as a tuple of
  `kind`; `name` is the field named in the error."""
  items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) \
      else list(value)
  try:
    return tuple(kind(x) for x in items)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}, got "
                     f"{value!r}") from None
