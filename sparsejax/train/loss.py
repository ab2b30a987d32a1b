"""The language-modelling loss, as sums so that microbatches and eval batches add up exactly."""
import jax
import jax.numpy as jnp


def lm_loss_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                 token_bytes: jax.Array, z_loss_weight: float = 0.0) -> dict[str, jax.Array]:
  """Per-batch sums of the next-token loss.

  Args:
    logits: [batch, seq, vocab] float32.
    targets: [batch, seq] int ids.
    loss_mask: [batch, seq] 1 where the target counts.
    token_bytes: [vocab] UTF-8 bytes each token id stands for (bits per byte = nats / ln 2 /
      bytes, which compares models with different tokenizers).
    z_loss_weight: weight of the PaLM z-loss (log Z)^2, which keeps the softmax normaliser
      near 1; 0 disables it.
  Returns:
    {"nll": sum of -log p, "z": sum of (log Z)^2 weighted, "tokens": mask sum, "bytes": sum of
    target bytes under the mask}.
  """
  mask = loss_mask.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (log_z - target_logit) * mask
  return {
      "nll": jnp.sum(nll),
      "z": z_loss_weight * jnp.sum(jnp.square(log_z) * mask),
      "tokens": jnp.sum(mask),
      "bytes": jnp.sum(token_bytes[targets].astype(jnp.float32) * mask),
  }


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Mean loss per token and bits per byte from accumulated sums."""
  tokens = jnp.maximum(sums["tokens"], 1.0)
  return {"loss": sums["nll"] / tokens,
          "bits_per_byte": sums["nll"] / jnp.log(2.0) / jnp.maximum(sums["bytes"], 1.0)}
