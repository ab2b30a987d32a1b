"""InfLLM-V2 block scoring (compressed-key softmax, group sum, max-pool) as one fused kernel."""
from pallas_kernels.block_scores.decode import (decode_selection_keys, select_and_attend_forced,
                                                select_decode_blocks)
from pallas_kernels.block_scores.op import IMPLEMENTATIONS, block_scores, score_and_select

__all__ = ["IMPLEMENTATIONS", "block_scores", "decode_selection_keys", "score_and_select",
           "select_and_attend_forced", "select_decode_blocks"]
