"""KV cache, generation and sampling (eviction and offloading policies plug in here)."""
from sparsejax.inference.eviction import (EvictingGenerator, EvictionConfig,
                                          generate_with_eviction, prefill_with_eviction)
from sparsejax.inference.generate import generate
from sparsejax.inference.sampling import sample_next
from sparsejax.inference.scorers import SCORERS, ScoreInputs, register_scorer
from sparsejax.layers.kv_cache import KVCache, LayerKV

__all__ = ["generate", "sample_next", "KVCache", "LayerKV", "EvictionConfig",
           "EvictingGenerator", "generate_with_eviction", "prefill_with_eviction", "SCORERS",
           "ScoreInputs", "register_scorer"]
