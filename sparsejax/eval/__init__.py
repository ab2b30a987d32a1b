"""Long-context evaluation: RULER-style synthetic tasks, the scoring harness and long perplexity."""
from sparsejax.eval.harness import (compare_methods, evaluate, markdown_table, paired_bootstrap,
                                    score, write_results)
from sparsejax.eval.perplexity import long_documents, long_perplexity
from sparsejax.eval.tasks import DEPTH_TASKS, HAYSTACKS, TASKS, Sample, make_sample

__all__ = [
    "DEPTH_TASKS",
    "HAYSTACKS",
    "Sample",
    "TASKS",
    "compare_methods",
    "evaluate",
    "long_documents",
    "long_perplexity",
    "make_sample",
    "markdown_table",
    "paired_bootstrap",
    "score",
    "write_results",
]
