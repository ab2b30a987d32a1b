"""Flax NNX modules built on sparsejax.ops (and pallas_kernels): the model's building blocks."""
from sparsejax.layers import attention as _attention  # registers "dense", "sliding_window"
from sparsejax.layers import ffn as _ffn  # registers "swiglu"
from sparsejax.layers import infllmv2 as _infllmv2  # registers "infllmv2"
from sparsejax.layers import moe as _moe  # registers "blockffn", "topk_moe", "remoe", "relu_ffn"
from sparsejax.layers import nosa as _nosa  # registers "nosa"
from sparsejax.layers.attention import GroupedQueryAttention, SlidingWindowAttention
from sparsejax.layers.common import RMSNorm
from sparsejax.layers.ffn import SwiGLU
from sparsejax.layers.infllmv2 import InfLLMv2Attention
from sparsejax.layers.kv_cache import KVCache, LayerKV
from sparsejax.layers.nosa import NOSAAttention
from sparsejax.layers.registry import ATTENTION_KINDS, FFN_KINDS, register_attention, register_ffn

__all__ = ["GroupedQueryAttention", "InfLLMv2Attention", "NOSAAttention", "SlidingWindowAttention", "RMSNorm", "SwiGLU", "KVCache", "LayerKV", "ATTENTION_KINDS",
           "FFN_KINDS", "register_attention", "register_ffn"]
