"""InfLLM-V2's top-k block selection as a sort-free kernel (radix threshold + cumsum)."""
from pallas_kernels.block_topk.op import (IMPLEMENTATIONS, merge_tail, select_blocks,
                                          top_blocks, top_blocks_fn)

__all__ = ["IMPLEMENTATIONS", "merge_tail", "select_blocks", "top_blocks", "top_blocks_fn"]
