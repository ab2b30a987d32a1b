"""Block-sparse flash-decoding: one query token per row against a KV cache, over selected blocks
(InfLLM-V2's decode attention)."""
from pallas_kernels.sparse_decode.op import IMPLEMENTATIONS, default_num_splits, sparse_decode
from pallas_kernels.sparse_decode.reference import sparse_decode_reference

__all__ = ["IMPLEMENTATIONS", "default_num_splits", "sparse_decode", "sparse_decode_reference"]
