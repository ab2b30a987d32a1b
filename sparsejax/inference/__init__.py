"""KV cache, generation and sampling (eviction and offloading policies plug in here)."""
from sparsejax.inference.generate import generate
from sparsejax.inference.sampling import sample_next
from sparsejax.layers.kv_cache import KVCache, LayerKV

__all__ = ["generate", "sample_next", "KVCache", "LayerKV"]
