"""Optimizer and learning-rate schedules (warmup-stable-decay, cosine, constant)."""
import jax
import jax.numpy as jnp
import optax


def make_schedule(kind: str, *, lr: float, steps: int, warmup_steps: int,
                  decay_fraction: float = 0.1, min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Learning rate as a function of the step.

  "wsd" (MiniCPM's warmup-stable-decay): linear warmup, a long constant phase, then the last
  `decay_fraction` of the steps decay (cosine-shaped) to `min_lr_ratio * lr`.
  "cosine": warmup then cosine to `min_lr_ratio * lr`. "constant": warmup then flat.
  """
  if steps <= 0:
    raise ValueError(f"make_schedule: steps must be positive, got {steps}")
  if not 0 <= warmup_steps <= steps:
    raise ValueError(f"make_schedule: warmup_steps must be in [0, steps={steps}], got {warmup_steps}")
  warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  if kind == "constant":
    body, boundary = optax.constant_schedule(lr), warmup_steps
    return optax.join_schedules([warmup, body], [boundary])
  if kind == "cosine":
    body = optax.cosine_decay_schedule(lr, max(steps - warmup_steps, 1), alpha=min_lr_ratio)
    return optax.join_schedules([warmup, body], [warmup_steps])
  if kind == "wsd":
    if not 0 < decay_fraction <= 1:
      raise ValueError(f"make_schedule: decay_fraction must be in (0, 1], got {decay_fraction}")
    decay_steps = max(int(round(steps * decay_fraction)), 1)
    stable_steps = max(steps - warmup_steps - decay_steps, 0)
    stable = optax.constant_schedule(lr)
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    return optax.join_schedules([warmup, stable, decay],
                                [warmup_steps, warmup_steps + stable_steps])
  raise ValueError(f"make_schedule: kind must be 'wsd', 'cosine' or 'constant', got {kind!r}")


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping; weight decay applies to matrices only (not norms)."""
  schedule = make_schedule(train_cfg.schedule, lr=train_cfg.lr, steps=train_cfg.steps,
                           warmup_steps=train_cfg.warmup_steps,
                           decay_fraction=train_cfg.decay_fraction,
                           min_lr_ratio=train_cfg.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                           weight_decay=train_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
