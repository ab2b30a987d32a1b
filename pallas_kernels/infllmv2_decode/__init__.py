"""InfLLM-V2's decode step from the cached compressed keys: block_scores' decode kernels select
(and attend the forced blocks meanwhile), sparse_decode attends the rest and merges."""
from pallas_kernels.infllmv2_decode.op import (IMPLEMENTATIONS, resolve_forced_splits,
                                              infllmv2_decode)

__all__ = ["IMPLEMENTATIONS", "resolve_forced_splits", "infllmv2_decode"]
