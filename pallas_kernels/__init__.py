"""Pallas GPU kernels, one folder per family. Each exposes a jittable op with an
`implementation=` switch ("pallas" | "interpret" | "reference") and its own jnp reference, and
depends on jax only (never on sparsejax)."""
