"""The FFN kinds of the BlockFFN ablation (arXiv 2507.08771): BlockFFN, its baselines TopK MoE and
ReMoE, and the dense non-gated ReLU FFN ("swiglu" in layers/ffn.py is the gated dense baseline).

Every expert kind has the same experts, E non-gated FFNs E_i(x) = SiLU(x W_up_i) W_down_i of
width w, and differs in its router. Training computes all experts densely (one [d, E*w] matmul
up, one [E*w, d] matmul down) and multiplies each expert's hidden units by its gate, which is
exact and fast; a chunk-sparse kernel (pallas_kernels) runs only the experts a chunk of tokens
uses.

Parameter layout (a contract with the kernels; names and shapes exactly):
  w_router [d_model, E]   logical axes ("embed", "experts")
  w_up     [d_model, E, w] ("embed", "experts", "expert_mlp")
  w_down   [E, w, d_model] ("experts", "expert_mlp", "embed")
  router_norm/scale [E]   (BlockFFN only) the RMSNorm over the expert axis, ("norm",)

aux (see layers/ffn.py and model.py): "loss/<name>" is an auxiliary loss already multiplied by
its fixed weight; "scaled_loss/<name>" is a raw loss that the trainer multiplies by the adaptive
coefficient <name> (sparsejax.train.coefficients; each kind's `coefficients(config)` builds the
controllers); "metric/..." are sparsity metrics (sparsejax.ops.sparsity). Losses are summed over
layers, metrics averaged.

The module-level functions are the pure math (tests and kernels check against them); the
classes hold parameters and options.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.config import ModelConfig
from sparsejax.ops.sparsity import same_document_pairs, sparsity_metrics
from sparsejax.layers.common import RMSNorm, param
from sparsejax.layers.registry import register_ffn
from sparsejax.train.coefficients import Constant, TargetController, WindowRatioController


# ---- options ----------------------------------------------------------------------------------
_CHECKS = {
    "positive_int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                     "a positive int"),
    "positive_float": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "nonneg_float": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "above_one": (lambda v: _is_number(v) and v > 1, "a number > 1"),
    "at_least_one": (lambda v: _is_number(v) and v >= 1, "a number >= 1"),
    "nonneg_int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   "an int >= 0"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "schedule": (lambda v: v in ("adaptive", "constant"), "'adaptive' or 'constant'"),
    "width": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
              "a positive int or None (= ffn_hidden // num_experts)"),
}
_FLOAT_CHECKS = ("positive_float", "nonneg_float", "fraction", "above_one", "at_least_one")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt(default, check: str):
  return dataclasses.field(default=default, metadata={"check": check})


@dataclasses.dataclass(frozen=True)
class _Options:
  """Base of each kind's options: parsed from ModelConfig.ffn_options, every key checked."""

  @classmethod
  def parse(cls, config: ModelConfig, kind: str):
    given = config.ffn_kwargs()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
      raise ValueError(f"ffn={kind!r}: unknown ffn_options {unknown}; known: {sorted(fields)}")
    values = {}
    for name, value in given.items():
      check = fields[name].metadata["check"]
      ok, expected = _CHECKS[check]
      if not ok(value):
        raise ValueError(f"ffn={kind!r}: ffn_options[{name!r}] must be {expected}, got {value!r}")
      values[name] = float(value) if check in _FLOAT_CHECKS else value
    return cls(**values)._resolved(config, kind)

  def _resolved(self, config: ModelConfig, kind: str):
    return self


@dataclasses.dataclass(frozen=True)
class ExpertOptions(_Options):
  """num_experts: E. expert_width: w (None: ffn_hidden // num_experts, which then must divide)."""
  num_experts: int = _opt(16, "positive_int")
  expert_width: int | None = _opt(None, "width")

  def _resolved(self, config: ModelConfig, kind: str):
    if self.expert_width is not None:
      return self
    if config.ffn_hidden % self.num_experts:
      raise ValueError(
          f"ffn={kind!r}: ffn_options['expert_width'] is unset and ModelConfig.ffn_hidden="
          f"{config.ffn_hidden} is not a multiple of ffn_options['num_experts']="
          f"{self.num_experts}; set expert_width")
    return dataclasses.replace(self, expert_width=config.ffn_hidden // self.num_experts)


@dataclasses.dataclass(frozen=True)
class BlockFFNOptions(ExpertOptions):
  """BlockFFN's losses and the lambda_cs schedule (paper values as defaults).

  use_al / use_cs switch the activation-locality / chunk-sparsification losses (the "no_al",
  "no_cs" ablations). al_weight and alpha: L_al's fixed weight and sigmoid sharpness.
  cs_weight: lambda_cs0. chunk_len: tokens per chunk of L_cs. cs_schedule "adaptive" follows the
  paper's rule (hold cs_hold steps, then compare windows of cs_window steps, the rise factor at
  least cs_min_rise, capped at cs_max_ratio * lambda_cs0); "constant" keeps lambda_cs0.
  """
  use_al: bool = _opt(True, "bool")
  use_cs: bool = _opt(True, "bool")
  al_weight: float = _opt(2e-3, "nonneg_float")
  alpha: float = _opt(100.0, "positive_float")
  cs_weight: float = _opt(5e-2, "nonneg_float")
  chunk_len: int = _opt(64, "positive_int")
  cs_schedule: str = _opt("adaptive", "schedule")
  cs_hold: int = _opt(1000, "positive_int")
  cs_window: int = _opt(100, "positive_int")
  cs_min_rise: float = _opt(1.025, "at_least_one")
  cs_max_ratio: float = _opt(4.0, "at_least_one")

  def _resolved(self, config: ModelConfig, kind: str):
    if self.cs_hold < self.cs_window:
      raise ValueError(f"ffn={kind!r}: ffn_options['cs_hold']={self.cs_hold} must be >= "
                       f"ffn_options['cs_window']={self.cs_window} (the first update compares "
                       "the first window after the hold with the last one inside it)")
    return super()._resolved(config, kind)


@dataclasses.dataclass(frozen=True)
class TopKOptions(ExpertOptions):
  """top_k experts per token; renormalize: gates of the chosen experts sum to 1; balance_weight:
  the fixed weight of the Switch/GShard balance loss."""
  top_k: int = _opt(2, "positive_int")
  renormalize: bool = _opt(True, "bool")
  balance_weight: float = _opt(1e-2, "nonneg_float")

  def _resolved(self, config: ModelConfig, kind: str):
    if self.top_k > self.num_experts:
      raise ValueError(f"ffn={kind!r}: ffn_options['top_k']={self.top_k} exceeds "
                       f"num_experts={self.num_experts}")
    return super()._resolved(config, kind)


@dataclasses.dataclass(frozen=True)
class ReMoEOptions(ExpertOptions):
  """target_sparsity: the fraction of inactive experts the L1 coefficient steers to; l1_weight:
  its initial value (ReMoE: 1e-8); l1_multiplier: the per-step factor; l1_lag: how many steps
  old the sparsity reading is when it updates the coefficient (1 keeps the device busy; 0 is the
  paper's rule exactly but waits for every step's metrics on the host)."""
  target_sparsity: float = _opt(0.8, "fraction")
  l1_weight: float = _opt(1e-8, "positive_float")
  l1_multiplier: float = _opt(1.05, "above_one")
  l1_lag: int = _opt(1, "nonneg_int")


@dataclasses.dataclass(frozen=True)
class NoOptions(_Options):
  pass


# ---- pure functions ---------------------------------------------------------------------------
def expert_hidden(x: jax.Array, w_up: jax.Array, gates: jax.Array) -> jax.Array:
  """The gated hidden units gates_i * SiLU(x W_up_i) of every expert.

  Args:
    x: [batch, seq, d_model] (its dtype is the compute dtype).
    w_up: [d_model, E, w].
    gates: [batch, seq, E]; an expert with gate 0 has all-zero hidden units.
  Returns:
    [batch, seq, E, w] in x's dtype.
  """
  if x.ndim != 3 or w_up.ndim != 3 or w_up.shape[0] != x.shape[-1]:
    raise ValueError(f"expert FFN: x must be [batch, seq, d_model] and w_up [d_model, E, w]; got "
                     f"x {x.shape}, w_up {w_up.shape}")
  if gates.shape != x.shape[:2] + w_up.shape[1:2]:
    raise ValueError(f"expert FFN: gates must be [batch, seq, E] = "
                     f"{x.shape[:2] + w_up.shape[1:2]}, got {gates.shape}")
  dt = x.dtype
  hidden = jax.nn.silu(jnp.einsum("btd,dew->btew", x, w_up.astype(dt)))
  return hidden * gates.astype(dt)[..., None]


def mix_experts(x: jax.Array, w_up: jax.Array, w_down: jax.Array, gates: jax.Array) -> jax.Array:
  """sum_i gates_i * SiLU(x W_up_i) W_down_i, all experts computed densely.

  Args:
    x: [batch, seq, d_model] (its dtype is the compute dtype).
    w_up: [d_model, E, w]; w_down: [E, w, d_model].
    gates: [batch, seq, E]; an expert with gate 0 contributes exactly nothing.
  Returns:
    [batch, seq, d_model] in x's dtype.
  """
  if w_down.shape != w_up.shape[1:] + x.shape[-1:]:
    raise ValueError(f"mix_experts: w_down must be [E, w, d_model] = "
                     f"{w_up.shape[1:] + x.shape[-1:]}, got {w_down.shape}")
  return jnp.einsum("btew,ewd->btd", expert_hidden(x, w_up, gates), w_down.astype(x.dtype))


def router_logits(x: jax.Array, w_router: jax.Array) -> jax.Array:
  """x [batch, seq, d_model] @ w_router [d_model, E] -> [batch, seq, E] float32."""
  return jnp.einsum("btd,de->bte", x, w_router.astype(x.dtype),
                    preferred_element_type=jnp.float32)


def _router_values(fn: str, name: str, value: jax.Array) -> jax.Array:
  if value.ndim != 3:
    raise ValueError(f"{fn}: {name} must be [batch, seq, E], got shape {value.shape}")
  return value


def _segments(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  if segment_ids is None:
    return jnp.ones(shape, jnp.int32)
  if segment_ids.shape != shape:
    raise ValueError(f"segment_ids must have shape {shape} ([batch, seq]), got "
                     f"{segment_ids.shape}")
  return segment_ids.astype(jnp.int32)


def activation_locality_loss(a0: jax.Array, segment_ids: jax.Array | None,
                             alpha: float) -> jax.Array:
  """BlockFFN's L_al: adjacent tokens of one document should switch the same experts on.

  For each pair (t-1, t) of adjacent real tokens of one document and each expert,
  BCE(sigmoid(alpha * A0_{t-1}), target sigmoid(alpha * A0_t)), a soft "is active" of the
  previous token predicting that of the current one; gradients reach both tokens. (The public
  code puts the previous token on the logits side; the paper writes the pair without an order.)
  Mean over pairs and experts; 0 when there is no pair.

  Args:
    a0: [batch, seq, E] float router pre-activations.
    segment_ids: [batch, seq] int (0 = padding) or None (one document per row).
    alpha: sigmoid sharpness (100 in the paper).
  Returns:
    float32 scalar.
  """
  a0 = _router_values("activation_locality_loss", "a0", a0).astype(jnp.float32)
  seg = _segments(segment_ids, a0.shape[:2])
  logits = alpha * a0[:, :-1]
  target = jax.nn.sigmoid(alpha * a0[:, 1:])
  bce = jax.nn.softplus(logits) - target * logits  # = -[q log s(z) + (1-q) log(1-s(z))]
  pair = same_document_pairs(seg)[..., None]
  count = jnp.sum(pair) * a0.shape[-1]
  return jnp.sum(jnp.where(pair, bce, 0.0)) / jnp.maximum(count, 1)


def chunk_sparsification_loss(a1: jax.Array, segment_ids: jax.Array | None,
                              chunk_len: int) -> jax.Array:
  """BlockFFN's L_cs: the probability that an expert is used anywhere in a chunk.

  p_ti = A1_ti / sum_j A1_tj (0 for a token whose router output is all 0) is read as the chance
  that token t uses expert i; P_act(g, i) = 1 - prod_{t in g} (1 - p_ti) over the tokens of a
  group g. Groups: each row is cut into chunks of `chunk_len` positions (from position 0; the
  last may be shorter), and a chunk is split further by document: the tokens of one document
  inside one chunk form a group (a chunk-sparse kernel serves one sequence, so experts shared
  across documents save nothing). Padding belongs to no group. L_cs = mean over groups and
  experts of P_act. (The public code chunks the flattened batch and ignores document
  boundaries; with documents longer than a chunk the two differ only at boundaries.)

  Args:
    a1: [batch, seq, E] float, ReLU router outputs (>= 0).
    segment_ids: [batch, seq] int (0 = padding) or None (one document per row).
    chunk_len: positions per chunk (64 in the paper).
  Returns:
    float32 scalar in [0, 1] (0 when there is no real token).
  """
  if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
    raise ValueError(f"chunk_sparsification_loss: chunk_len must be a positive int, got "
                     f"{chunk_len!r}")
  batch, seq, experts = _router_values("chunk_sparsification_loss", "a1", a1).shape
  seg = _segments(segment_ids, (batch, seq))
  a1 = a1.astype(jnp.float32)
  total = jnp.sum(a1, axis=-1, keepdims=True)
  p = jnp.where(total > 0, a1 / jnp.where(total > 0, total, 1.0), 0.0)
  # 1e-6 keeps log(1 - p) and its gradient finite when one expert takes a whole token (p = 1).
  log_keep = jnp.log(1.0 + 1e-6 - p)
  pad = -seq % chunk_len
  log_keep = jnp.pad(log_keep, ((0, 0), (0, pad), (0, 0)))
  seg = jnp.pad(seg, ((0, 0), (0, pad)))
  chunks = (seq + pad) // chunk_len
  log_keep = log_keep.reshape(batch, chunks, chunk_len, experts)
  seg = seg.reshape(batch, chunks, chunk_len)
  real = seg != 0
  same = (seg[..., :, None] == seg[..., None, :]) & real[..., :, None] & real[..., None, :]
  # group_log[t] = sum over the tokens u of t's group of log(1 - p_u)
  group_log = jnp.einsum("bntu,bnue->bnte", same.astype(jnp.float32), log_keep,
                         precision=jax.lax.Precision.HIGHEST)
  p_act = jnp.mean(1.0 - jnp.exp(group_log), axis=-1)  # [b, n, L]
  group_size = jnp.sum(same, axis=-1)  # each group counted once: every token adds 1/|g|
  weight = jnp.where(real, 1.0 / jnp.maximum(group_size, 1), 0.0)
  return jnp.sum(weight * p_act) / jnp.maximum(jnp.sum(weight), 1e-9)


def top_k_gates(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
  """Softmax router with top-k selection.

  Args:
    logits: [batch, seq, E] float32.
    k: experts per token.
    renormalize: divide the chosen probabilities by their sum (Mixtral; the BlockFFN paper's
      TopK baseline), so the output scale does not depend on k or on how peaked the router is.
  Returns:
    (gates [batch, seq, E], zero outside the top k; probs [batch, seq, E], the full softmax).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  _, index = jax.lax.top_k(probs, k)
  chosen = jnp.sum(jax.nn.one_hot(index, probs.shape[-1], dtype=jnp.bool_), axis=-2) > 0
  gates = jnp.where(chosen, probs, 0.0)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return gates, probs


def _real_mean(values: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """Mean over the real tokens of [batch, seq, E] values -> [E]."""
  seg = _segments(segment_ids, values.shape[:2])
  real = (seg != 0)[..., None]
  return jnp.sum(jnp.where(real, values, 0.0), axis=(0, 1)) / jnp.maximum(jnp.sum(real), 1)


def switch_balance_loss(probs: jax.Array, chosen: jax.Array,
                        segment_ids: jax.Array | None) -> jax.Array:
  """Switch/GShard load balancing: E * sum_i f_i P_i over real tokens, f_i the share of
  (token, slot) assignments that went to expert i and P_i its mean router probability; 1 at a
  uniform router. probs, chosen: [batch, seq, E] (float, bool)."""
  load = _real_mean(chosen.astype(jnp.float32), segment_ids)
  load = load / jnp.maximum(jnp.sum(load), 1e-9)
  importance = _real_mean(probs.astype(jnp.float32), segment_ids)
  return probs.shape[-1] * jnp.sum(jax.lax.stop_gradient(load) * importance)


def remoe_l1_loss(gates: jax.Array, segment_ids: jax.Array | None,
                  target_sparsity: float) -> jax.Array:
  """ReMoE's load-balanced L1 penalty on the ReLU router outputs.

  sum_i (f_i / (1 - target)) * mean_t R_ti over real tokens, f_i the fraction of tokens for
  which expert i is active (no gradient). At a balanced load at the target sparsity every
  f_i = 1 - target and this is the plain mean L1 norm of R_t; busier experts are pushed harder.

  Args:
    gates: [batch, seq, E] float32, R = ReLU(router logits).
    segment_ids: [batch, seq] int (0 = padding) or None.
    target_sparsity: the target fraction of inactive experts, in (0, 1).
  """
  load = jax.lax.stop_gradient(_real_mean((gates > 0).astype(jnp.float32), segment_ids))
  return jnp.sum(load / (1.0 - target_sparsity) * _real_mean(gates, segment_ids))


# ---- modules ----------------------------------------------------------------------------------
class ExpertFFN(nnx.Module):
  """Router + E SiLU experts; subclasses define the gates, losses and coefficients. Public: the
  union-of-experts decode (sparsejax.inference.union_decode) serves any of them."""

  kind: ClassVar[str]
  Options: ClassVar[type] = ExpertOptions

  @classmethod
  def options(cls, config: ModelConfig):
    return cls.Options.parse(config, cls.kind)

  @classmethod
  def matmul_params(cls, config: ModelConfig) -> int:
    """Weights multiplying each token in training (the router and every expert: the dense
    compute), for MFU."""
    o = cls.options(config)
    return config.d_model * o.num_experts * (1 + 2 * o.expert_width)

  @classmethod
  def coefficients(cls, config: ModelConfig) -> dict:
    return {}

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    o = self.options(config)
    d, e, w, pdt = config.d_model, o.num_experts, o.expert_width, config.params_dtype
    self.opts = o
    # Set by sparsejax.inference.union_decode.prepare_union_decode (data: it holds arrays).
    self.union_decode = nnx.data(None)
    self.w_router = param(rngs, (d, e), ("embed", "experts"), std=config.init_std, dtype=pdt)
    self.w_up = param(rngs, (d, e, w), ("embed", "experts", "expert_mlp"), std=config.init_std,
                      dtype=pdt)
    self.w_down = param(rngs, (e, w, d), ("experts", "expert_mlp", "embed"),
                        std=config.init_std / (2 * config.num_layers) ** 0.5, dtype=pdt)

  def experts(self, x: jax.Array, gates: jax.Array) -> jax.Array:
    # One new token per row (a decode step) with a union-of-experts kernel installed
    # (sparsejax.inference.union_decode): only the experts some row uses are read.
    union_decode = self.union_decode
    if union_decode is not None and union_decode.applies(x):
      return union_decode(x, gates)
    return mix_experts(x, self.w_up[...], self.w_down[...], gates)

  def gates(self, x: jax.Array) -> jax.Array:
    """x [batch, seq, d] -> the experts' weights [batch, seq, E] (0: inactive)."""
    raise NotImplementedError

  def hidden_units(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The FFN as one layer of E*w neurons: (hidden [batch, seq, E*w], w_out [E*w, d]) with
    output = hidden @ w_out (for neuron-level analyses such as PPL-p% sparsity)."""
    batch, seq, d = x.shape
    hidden = expert_hidden(x, self.w_up[...], self.gates(x))
    w_out = self.w_down[...].astype(x.dtype)
    return hidden.reshape(batch, seq, -1), w_out.reshape(-1, d)


@register_ffn("blockffn")
class BlockFFN(ExpertFFN):
  """A0 = x W_r, A1 = ReLU(A0), A = RMSNorm(A1) over experts; out = sum_i A_i E_i(x).

  No top-k and no balance loss. aux: "loss/al" (al_weight * L_al), "scaled_loss/cs" (raw L_cs,
  weighted by the adaptive coefficient "cs"), the sparsity metrics (expert i is active for a
  token iff A1_i > 0).
  """

  kind = "blockffn"
  Options = BlockFFNOptions

  @classmethod
  def coefficients(cls, config: ModelConfig) -> dict:
    o = cls.options(config)
    if not o.use_cs:
      return {}
    if o.cs_schedule == "constant":
      return {"cs": Constant(o.cs_weight)}
    return {"cs": WindowRatioController(
        o.cs_weight, metric="scaled_loss/cs", hold=o.cs_hold, window=o.cs_window,
        min_rise=o.cs_min_rise, max_ratio=o.cs_max_ratio)}

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.router_norm = RMSNorm(self.opts.num_experts, eps=config.norm_eps,
                               param_dtype=config.params_dtype)

  def gates(self, x: jax.Array) -> jax.Array:
    return self.route(x)[2]

  def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [batch, seq, d] -> (A0, A1, A), each [batch, seq, E] float32."""
    a0 = router_logits(x, self.w_router[...])
    a1 = jax.nn.relu(a0)
    return a0, a1, self.router_norm(a1)

  def __call__(self, x: jax.Array, *, segment_ids=None) -> tuple[jax.Array, dict]:
    o = self.opts
    a0, a1, a = self.route(x)
    aux = sparsity_metrics(a1 > 0, segment_ids)
    if o.use_al:
      aux["loss/al"] = o.al_weight * activation_locality_loss(a0, segment_ids, o.alpha)
    if o.use_cs:
      aux["scaled_loss/cs"] = chunk_sparsification_loss(a1, segment_ids, o.chunk_len)
    return self.experts(x, a), aux


@register_ffn("topk_moe")
class TopKMoE(ExpertFFN):
  """Softmax router, the top_k experts per token (gates renormalised by default, as the BlockFFN
  paper's TopK baseline and Mixtral do). aux: "loss/balance" (balance_weight * Switch loss)."""

  kind = "topk_moe"
  Options = TopKOptions

  def gates(self, x: jax.Array) -> jax.Array:
    o = self.opts
    return top_k_gates(router_logits(x, self.w_router[...]), o.top_k, o.renormalize)[0]

  def __call__(self, x: jax.Array, *, segment_ids=None) -> tuple[jax.Array, dict]:
    o = self.opts
    gates, probs = top_k_gates(router_logits(x, self.w_router[...]), o.top_k, o.renormalize)
    chosen = gates > 0
    aux = sparsity_metrics(chosen, segment_ids)
    aux["loss/balance"] = o.balance_weight * switch_balance_loss(probs, chosen, segment_ids)
    return self.experts(x, gates), aux


@register_ffn("remoe")
class ReMoE(ExpertFFN):
  """ReLU router R = ReLU(x W_r), out = sum_i R_i E_i(x) (arXiv 2412.14711). aux:
  "scaled_loss/l1" (the raw load-balanced L1 penalty), weighted by the coefficient "l1" that is
  multiplied by l1_multiplier after each step whose token-level sparsity is below the target and
  divided by it otherwise."""

  kind = "remoe"
  Options = ReMoEOptions

  @classmethod
  def coefficients(cls, config: ModelConfig) -> dict:
    o = cls.options(config)
    return {"l1": TargetController(o.l1_weight, metric="metric/tls", target=o.target_sparsity,
                                   multiplier=o.l1_multiplier, lag=o.l1_lag)}

  def gates(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(router_logits(x, self.w_router[...]))

  def __call__(self, x: jax.Array, *, segment_ids=None) -> tuple[jax.Array, dict]:
    o = self.opts
    gates = self.gates(x)
    aux = sparsity_metrics(gates > 0, segment_ids)
    aux["scaled_loss/l1"] = remoe_l1_loss(gates, segment_ids, o.target_sparsity)
    return self.experts(x, gates), aux


@register_ffn("relu_ffn")
class ReLUFFN(nnx.Module):
  """ReLU(x W_up) W_down with ffn_hidden units: the dense non-gated ReLU FFN of the Sparsing-Law
  analysis. aux: "metric/neuron_sparsity", the mean fraction of zero hidden units per real
  token."""

  kind = "relu_ffn"

  @classmethod
  def options(cls, config: ModelConfig):
    return NoOptions.parse(config, cls.kind)

  @staticmethod
  def matmul_params(config: ModelConfig) -> int:
    return 2 * config.d_model * config.ffn_hidden

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.options(config)
    d, f, pdt = config.d_model, config.ffn_hidden, config.params_dtype
    self.w_up = param(rngs, (d, f), ("embed", "mlp"), std=config.init_std, dtype=pdt)
    self.w_down = param(rngs, (f, d), ("mlp", "embed"),
                        std=config.init_std / (2 * config.num_layers) ** 0.5, dtype=pdt)

  def hidden_units(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [batch, seq, d] -> (hidden [batch, seq, ffn_hidden], w_out [ffn_hidden, d]); the
    output is hidden @ w_out."""
    dt = x.dtype
    return jax.nn.relu(x @ self.w_up[...].astype(dt)), self.w_down[...].astype(dt)

  def __call__(self, x: jax.Array, *, segment_ids=None) -> tuple[jax.Array, dict[str, Any]]:
    hidden, w_out = self.hidden_units(x)
    zero = jax.lax.stop_gradient(jnp.mean(hidden == 0, axis=-1, dtype=jnp.float32))
    seg = _segments(segment_ids, x.shape[:2])
    real = seg != 0
    sparsity = jnp.sum(jnp.where(real, zero, 0.0)) / jnp.maximum(jnp.sum(real), 1)
    return hidden @ w_out, {"metric/neuron_sparsity": sparsity}
