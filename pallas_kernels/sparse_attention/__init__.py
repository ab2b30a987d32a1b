"""Per-token block-sparse causal attention (InfLLM-V2's and NOSA's attention kernels)."""
from pallas_kernels.sparse_attention.index import query_block_unions
from pallas_kernels.sparse_attention.op import IMPLEMENTATIONS, Launch, sparse_attention
from pallas_kernels.sparse_attention.reference import sparse_attention_reference

__all__ = ["IMPLEMENTATIONS", "Launch", "query_block_unions", "sparse_attention",
           "sparse_attention_reference"]
