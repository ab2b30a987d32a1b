"""Pure jnp functions: the semantics and numerical reference of every method."""
from sparsejax.ops.attention import attention_mask, dense_attention
from sparsejax.ops.norm import rms_norm
from sparsejax.ops.rope import apply_rope

__all__ = ["attention_mask", "dense_attention", "rms_norm", "apply_rope"]
