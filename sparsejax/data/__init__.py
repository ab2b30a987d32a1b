"""Data: tokenizers, corpora and the grain input pipeline."""

from sparsejax.data.corpus import (
    load_token_file,
    read_text,
    resolve_corpus,
    split_files,
    stdlib_files,
)
from sparsejax.data.pipeline import (
    BATCH_KEYS,
    DataConfig,
    build_tokenizer,
    make_eval_batches,
    make_train_iterator,
)
from sparsejax.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
    make_tokenizer,
)

__all__ = [
    "BATCH_KEYS",
    "BPETokenizer",
    "ByteTokenizer",
    "DataConfig",
    "build_tokenizer",
    "load_token_file",
    "load_tokenizer",
    "make_eval_batches",
    "make_tokenizer",
    "make_train_iterator",
    "read_text",
    "resolve_corpus",
    "split_files",
    "stdlib_files",
]
