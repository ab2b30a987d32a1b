"""Generation: batched prompts of different lengths, greedy and nucleus sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.inference import generate, sample_next
from sparsejax.model import DecoderLM
from tests.test_model import small_config


def greedy_by_full_forward(model, prompt, steps):
  seq = list(prompt)
  for _ in range(steps):
    logits, _, _ = model(jnp.asarray([seq]))
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(prompt):]


def test_batched_greedy_equals_full_forward():
  model = DecoderLM(small_config(), rngs=nnx.Rngs(0))
  prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [42]]
  outs = generate(model, prompts, max_new_tokens=6)
  for prompt, out in zip(prompts, outs):
    assert out == greedy_by_full_forward(model, prompt, 6)


def test_eos_cuts_the_continuation():
  model = DecoderLM(small_config(), rngs=nnx.Rngs(0))
  full = generate(model, [[1, 2, 3]], max_new_tokens=6)[0]
  cut = generate(model, [[1, 2, 3]], max_new_tokens=6, eos_id=full[2])[0]
  assert cut == full[:full.index(full[2])]


def test_sampling_follows_the_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: sample_next(logits, k, temperature=1.0))(keys))[:, 0]
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05],
                             atol=0.03)
  # top_p = 0.7 keeps the two most likely tokens (0.5 + 0.3 >= 0.7), renormalised.
  draws = np.asarray(jax.vmap(lambda k: sample_next(logits, k, temperature=1.0, top_p=0.7))(keys))
  np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=4) / 4000,
                             [0.625, 0.375, 0, 0], atol=0.03)
  assert int(sample_next(logits, keys[0])[0]) == 0  # temperature 0: greedy


def test_generation_errors():
  model = DecoderLM(small_config(max_seq_len=16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exceeds ModelConfig.max_seq_len=16"):
    generate(model, [[1] * 10], max_new_tokens=7)
  with pytest.raises(ValueError, match="outside \\[0, 97\\)"):
    generate(model, [[1, 200]], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p must be in"):
    sample_next(jnp.zeros((1, 4)), jax.random.key(0), temperature=1.0, top_p=0.0)
