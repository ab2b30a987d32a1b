"""Next-token sampling: greedy, temperature and nucleus (top-p)."""
import jax
import jax.numpy as jnp


def sample_next(logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0,
                top_p: float = 1.0) -> jax.Array:
  """logits [batch, vocab] -> token ids [batch] int32.

  temperature == 0 is greedy (argmax). Otherwise the logits are divided by the temperature and,
  when top_p < 1, restricted to the smallest set of most likely tokens whose probability mass
  reaches top_p (the most likely token always stays).
  """
  if temperature < 0:
    raise ValueError(f"sample_next: temperature must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"sample_next: top_p must be in (0, 1], got {top_p}")
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
