"""Data: read a corpus, train or load a tokenizer, tokenize and pack into blocks, write and read token shards.

    corpus = read_corpus("data/sample/train.jsonl")                      # datasets.Dataset: text (, lang)
    tokenizer = train_tokenizer(corpus, vocab_size=4096)                  # or load_tokenizer("my-128k-tok/")
    packed = tokenize_and_pack(corpus, tokenizer, block_size=1024, num_proc=4)
    write_shards("data/packed", {"train": packed, "valid": ...}, 1024, tokenizer=tokenizer)
    train_set = PackedDataset("data/packed", "train")                     # memory-mapped blocks

`prepare_data(TokenizeParams(...), out_dir)` runs the whole tokenize stage.
"""

from .corpus import DataError, read_corpus, resolve_corpus_files
from .packing import PackedCorpus, tokenize_and_pack, tokenize_documents
from .prepare import TokenizeParams, prepare_data, tokenizer_dir
from .shards import PackedDataset, data_fingerprint, make_random_shards, read_index, write_shards
from .tokenizer import DEFAULT_SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "DataError",
    "PackedCorpus",
    "PackedDataset",
    "TokenizeParams",
    "data_fingerprint",
    "load_tokenizer",
    "make_random_shards",
    "prepare_data",
    "read_corpus",
    "read_index",
    "resolve_corpus_files",
    "save_tokenizer",
    "tokenize_and_pack",
    "tokenize_documents",
    "tokenizer_dir",
    "train_tokenizer",
    "write_shards",
]
