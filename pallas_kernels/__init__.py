"""Pallas GPU kernels, one folder per family. Each exposes a jittable op with an
`implementation=` switch ("pallas" | "interpret" | "reference") and is tested against a jnp
reference. The attention, decode and union-FFN families carry their own reference and depend on
jax only; InfLLM-V2's selection kernels (block_scores, block_topk) take sparsejax.ops.infllmv2 as
theirs, the one semantics the model also runs, rather than keep a second copy of it."""
