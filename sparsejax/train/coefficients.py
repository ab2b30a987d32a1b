"""Adaptive loss coefficients: host-side controllers whose values enter the jitted train step as
an argument (a dict of float32 scalars, so a new value never recompiles the step).

Convention: an FFN may return "scaled_loss/<name>" in its aux (a raw, unweighted loss, summed
over layers by the model); the trainer adds coefficient[<name>] * that value to the loss. The
FFN kind builds the controllers with its `coefficients(config)` classmethod; each controller
observes one logged scalar of every step (a raw loss such as "scaled_loss/cs", or a metric such
as "metric/tls") and updates its value by its rule.

Timing, exactly (steps are numbered 1, 2, ... as the trainer counts them): the value used by step
s + 1 is the controller's state after observing the steps 1 .. s - lag. `WindowRatioController`
has lag 0 and only changes at window ends, so the host waits for the device once per window, not
every step: the per-step values stay on the device until a window closes, then come over in one
transfer. `TargetController` changes every step; with lag 1 (the default) the trainer reads step
s - 1's metric after it has queued step s, so the device never idles waiting for the host.

The controllers' state (values, the observations a rule still needs, and observations not yet
fetched) is JSON and goes into the checkpoint's metadata, so a resumed run uses exactly the
coefficients of an uninterrupted one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _number(value, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{what} must be a finite number, got {value!r}")
  return float(value)


def _positive_int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{what} must be a positive int, got {value!r}")
  return value


class Controller:
  """A coefficient with an update rule. Subclasses set `metric` (the per-step scalar observed;
  None observes nothing), `lag`, `wants(step)` and `_update(step, value)`."""

  metric: str | None = None
  lag: int = 0

  def __init__(self, initial: float):
    self.initial = _number(initial, "initial coefficient")
    if self.initial < 0:
      raise ValueError(f"initial coefficient must be >= 0, got {initial!r}")
    self.value = self.initial
    self.observed = 0  # the last step whose metric this controller has seen

  def wants(self, step: int) -> bool:
    """Whether the observation of `step` changes the value (so it must be fetched now)."""
    return False

  def observe(self, step: int, value: float) -> None:
    """Feeds the metric of `step`; steps must come in order, none skipped."""
    if step != self.observed + 1:
      raise ValueError(f"{type(self).__name__}.observe: step {step} after step {self.observed}; "
                       "observations must be consecutive")
    self.observed = step
    self._update(step, float(value))

  def _update(self, step: int, value: float) -> None:
    pass

  def state_dict(self) -> dict[str, Any]:
    return {"value": self.value, "observed": self.observed}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    self.value = float(state["value"])
    self.observed = int(state["observed"])


class Constant(Controller):
  """A fixed coefficient (a schedule switched off)."""


class WindowRatioController(Controller):
  """BlockFFN's lambda_cs schedule.

  Hold the initial value for `hold` steps; then after every step s = hold + k * window (k >= 1)
  take gamma = mean(x over steps s-window+1 .. s) / mean(x over the window before), x being the
  observed raw loss, and set lambda <- gamma * lambda if gamma <= 1, else
  max(min_rise, gamma) * lambda; lambda never exceeds max_ratio * initial. The new value is used
  from step s + 1. The first comparison (after step hold + window) uses the last window of the
  hold, so hold >= window. A previous window with mean 0 gives gamma = 1 (both 0) or the cap.
  """

  def __init__(self, initial: float, *, metric: str, hold: int = 1000, window: int = 100,
               min_rise: float = 1.025, max_ratio: float = 4.0):
    super().__init__(initial)
    self.metric = metric
    self.hold = _positive_int(hold, "hold")
    self.window = _positive_int(window, "window")
    if hold < window:
      raise ValueError(f"hold={hold} must be >= window={window}")
    self.min_rise = _number(min_rise, "min_rise")
    self.max_ratio = _number(max_ratio, "max_ratio")
    if self.min_rise < 1 or self.max_ratio < 1:
      raise ValueError(f"min_rise and max_ratio must be >= 1, got {min_rise!r}, {max_ratio!r}")
    self.history: list[float] = []  # the last 2 * window observations

  def wants(self, step: int) -> bool:
    return step >= self.hold + self.window and (step - self.hold) % self.window == 0

  def _update(self, step: int, value: float) -> None:
    self.history = (self.history + [value])[-2 * self.window:]
    if not self.wants(step):
      return
    previous = sum(self.history[:self.window]) / self.window
    last = sum(self.history[self.window:]) / self.window
    if previous > 0:
      gamma = last / previous
    else:
      gamma = 1.0 if last <= 0 else math.inf
    factor = gamma if gamma <= 1 else max(self.min_rise, gamma)
    self.value = min(self.value * factor, self.max_ratio * self.initial)

  def state_dict(self) -> dict[str, Any]:
    return super().state_dict() | {"history": list(self.history)}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    super().load_state_dict(state)
    self.history = [float(v) for v in state["history"]]


class TargetController(Controller):
  """ReMoE's rule: after each step, multiply by `multiplier` if the observed sparsity is below
  `target`, divide by it otherwise; the reading of step s changes the value of step s + 1 + lag.
  """

  def __init__(self, initial: float, *, metric: str, target: float, multiplier: float = 1.05,
               lag: int = 1):
    super().__init__(initial)
    if self.initial <= 0:
      raise ValueError(f"initial coefficient must be > 0 for a multiplicative rule, got {initial}")
    self.metric = metric
    self.target = _number(target, "target")
    self.multiplier = _number(multiplier, "multiplier")
    if self.multiplier <= 1:
      raise ValueError(f"multiplier must be > 1, got {multiplier!r}")
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
      raise ValueError(f"lag must be an int >= 0, got {lag!r}")
    self.lag = lag

  def wants(self, step: int) -> bool:
    return True

  def _update(self, step: int, value: float) -> None:
    if value < self.target:
      self.value *= self.multiplier
    else:
      self.value /= self.multiplier


class Coefficients:
  """The run's controllers by name, with the per-step observations still on the device."""

  def __init__(self, controllers: Mapping[str, Controller]):
    self.controllers = dict(controllers)
    self.pending: dict[str, list[tuple[int, Any]]] = {name: [] for name in self.controllers}

  @classmethod
  def for_model(cls, model_config) -> "Coefficients":
    """The controllers the model's FFN kind asks for (none for kinds without adaptive losses)."""
    from sparsejax.layers.registry import FFN_KINDS, lookup
    ffn = lookup(FFN_KINDS, model_config.ffn, "ffn")
    make = getattr(ffn, "coefficients", None)
    return cls({} if make is None else make(model_config))

  def values(self) -> dict[str, np.float32]:
    """The current values, the train step's argument."""
    return {name: np.float32(c.value) for name, c in self.controllers.items()}

  def record(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Takes the metrics of `step` (device arrays are fine) and brings every controller to the
    state that decides the value of step + 1, fetching from the device only when needed."""
    for name, c in self.controllers.items():
      if c.metric is None:
        continue
      if c.metric not in metrics:
        raise ValueError(f"coefficient {name!r} observes {c.metric!r}, which the train step does "
                         f"not report (it reports {sorted(metrics)})")
      self.pending[name].append((step, metrics[c.metric]))
      ready = step - c.lag
      if ready >= 1 and ready > c.observed and c.wants(ready):
        self._flush(name, ready)

  def _flush(self, name: str, upto: int) -> None:
    c, queue = self.controllers[name], self.pending[name]
    take = [entry for entry in queue if entry[0] <= upto]
    self.pending[name] = [entry for entry in queue if entry[0] > upto]
    fetched = jax.device_get([value for _, value in take])
    for (step, _), value in zip(take, fetched):
      c.observe(step, float(value))

  def state_dict(self) -> dict[str, Any]:
    """JSON: each controller's state plus its observations not yet fetched (fetched now)."""
    state = {}
    for name, c in self.controllers.items():
      queue = self.pending[name]
      fetched = jax.device_get([value for _, value in queue])
      state[name] = c.state_dict() | {
          "pending": [[step, float(v)] for (step, _), v in zip(queue, fetched)]}
    return state

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    if set(state) != set(self.controllers):
      raise ValueError(f"the checkpoint holds coefficients {sorted(state)} but this model has "
                       f"{sorted(self.controllers)}")
    for name, c in self.controllers.items():
      c.load_state_dict(state[name])
      self.pending[name] = [(int(step), float(v)) for step, v in state[name]["pending"]]


def weighted_aux_loss(aux: Mapping[str, Any], coefficients: Mapping[str, Any]):
  """sum of aux["loss/*"] + sum of coefficients[name] * aux["scaled_loss/<name>"] (a scalar)."""
  import jax.numpy as jnp
  total = jnp.zeros((), jnp.float32)
  for key, value in aux.items():
    if key.startswith("loss/"):
      total = total + value
    elif key.startswith("scaled_loss/"):
      name = key[len("scaled_loss/"):]
      if name not in coefficients:
        raise ValueError(f"the model returns {key!r} but there is no coefficient {name!r} "
                         f"(coefficients: {sorted(coefficients)}); its FFN kind's "
                         "coefficients(config) must provide it")
      total = total + coefficients[name] * value
  return total
