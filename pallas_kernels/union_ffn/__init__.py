"""BlockFFN's union-of-experts FFN for decode / speculative verification (n <= 128 tokens): reads
only the weights of the experts active for at least one token, from an expert-major layout made
once per layer (ExpertWeights.from_layer for the two-kernel path, FusedExpertWeights.from_layer
for UnionFFNConfig(fusion="fused"))."""
from pallas_kernels.union_ffn.kernel import UnionFFNConfig
from pallas_kernels.union_ffn.op import IMPLEMENTATIONS, union_ffn
from pallas_kernels.union_ffn.reference import (ExpertWeights, FusedExpertWeights, union_experts,
                                                union_ffn_gathered, union_ffn_reference,
                                                union_index)

__all__ = ["IMPLEMENTATIONS", "ExpertWeights", "FusedExpertWeights", "UnionFFNConfig",
           "union_experts", "union_ffn", "union_ffn_gathered", "union_ffn_reference",
           "union_index"]
