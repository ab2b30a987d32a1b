"""BlockFFN's union-of-experts FFN for decode / speculative verification (n <= 128 tokens): reads
only the weights of the experts active for at least one token, from the expert-major layout
(ExpertWeights.from_layer, once per layer)."""
from pallas_kernels.union_ffn.kernel import UnionFFNConfig
from pallas_kernels.union_ffn.op import IMPLEMENTATIONS, union_ffn
from pallas_kernels.union_ffn.reference import (ExpertWeights, union_experts, union_ffn_gathered,
                                                union_ffn_reference, union_index)

__all__ = ["IMPLEMENTATIONS", "ExpertWeights", "UnionFFNConfig", "union_experts", "union_ffn",
           "union_ffn_gathered", "union_ffn_reference", "union_index"]
