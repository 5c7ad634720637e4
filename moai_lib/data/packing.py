"""Tokenize documents (multiprocess `Dataset.map`) and pack the token stream into fixed-length blocks.

Each document becomes its tokens followed by eos (no bos: eos separates documents, GPT-2 style), so a block
may hold the end of one document and the start of the next. Documents are packed per language: every block
holds one language, which makes validation perplexity per language exact. The only tokens lost are the
last partial block of each language (reported as ``dropped_tokens``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .corpus import UNDETERMINED_LANG, DataError

logger = logging.getLogger(__name__)

TOKEN_DTYPE = np.uint32


def _encode_batch(texts: list[str], langs: list[str | None] | None = None, *, tokenizer, eos_token_id: int) -> dict:
    # add_special_tokens=False: a user tokenizer that adds bos per call (Llama style) must not put one
    # inside every packed document; eos alone separates documents.
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    out = {"input_ids": [x + [eos_token_id] for x in ids], "num_tokens": [len(x) + 1 for x in ids]}
    if langs is not None:  # a record without a language code is packed with the "und" ones, not dropped
        out["lang"] = [lang or UNDETERMINED_LANG for lang in langs]
    return out


def tokenize_documents(dataset, tokenizer, num_proc: int = 1, batch_size: int = 1000):
    """``text`` → ``input_ids`` (uint32, ending in eos) and ``num_tokens``; ``lang`` is kept when present.

    Runs `dataset.map(batched=True, num_proc=num_proc)`; with a cached corpus the result is cached too.
    """
    import datasets

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; packing needs one to separate documents")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise DataError(f"num_proc must be a positive integer, got {num_proc!r}")
    if num_proc > 1:
        # Each worker runs its own tokenizer; Rust-side threads on top would oversubscribe the cores.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    has_lang = "lang" in dataset.column_names
    features = datasets.Features({
        **({"lang": datasets.Value("string")} if has_lang else {}),
        "input_ids": datasets.Sequence(datasets.Value("uint32")),
        "num_tokens": datasets.Value("int64"),
    })
    return dataset.map(
        _encode_batch, batched=True, batch_size=batch_size, input_columns=["text", "lang"] if has_lang else ["text"],
        fn_kwargs={"tokenizer": tokenizer, "eos_token_id": eos}, remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= num_proc else None, desc="tokenizing",
    )


@dataclass
class PackedCorpus:
    """Tokenized documents and a block size; iterating yields ``(lang, blocks)`` with blocks a uint32 array
    (n, block_size). Packing streams over the tokenized Arrow table, so memory stays bounded by one batch of
    documents plus a partial block per language."""

    tokenized: object  # datasets.Dataset with input_ids, num_tokens and maybe lang
    block_size: int
    batch_docs: int = 4096

    @property
    def has_lang(self) -> bool:
        return "lang" in self.tokenized.column_names

    def __iter__(self) -> Iterator[tuple[str | None, np.ndarray]]:
        import pyarrow.compute as pc

        bs = self.block_size
        carry: dict[str | None, np.ndarray] = {}
        for table in self.tokenized.with_format("arrow").iter(batch_size=self.batch_docs):
            ids = table.column("input_ids")
            if self.has_lang:
                langs = table.column("lang")
                groups = [(lang, ids.filter(pc.equal(langs, lang))) for lang in pc.unique(langs).to_pylist()]
            else:
                groups = [(None, ids)]
            for lang, column in groups:
                flat = pc.list_flatten(column).to_numpy().astype(TOKEN_DTYPE, copy=False)
                if lang in carry:
                    flat = np.concatenate([carry[lang], flat])
                n = len(flat) // bs
                if n:
                    yield lang, flat[: n * bs].reshape(n, bs)
                carry[lang] = flat[n * bs:]

    def document_stats(self) -> dict[str | None, dict[str, int]]:
        """{lang: {"documents": n, "tokens": n}} over the tokenized documents (tokens include each eos)."""
        table = self.tokenized.select_columns(["lang", "num_tokens"] if self.has_lang else ["num_tokens"])
        table = table.with_format("arrow")[:]
        if not self.has_lang:
            return {None: {"documents": table.num_rows, "tokens": int(table.column("num_tokens").to_numpy().sum())}}
        grouped = table.group_by("lang").aggregate([("num_tokens", "sum"), ("num_tokens", "count")])
        return {lang: {"documents": int(c), "tokens": int(s)} for lang, s, c in zip(
            grouped.column("lang").to_pylist(), grouped.column("num_tokens_sum").to_pylist(),
            grouped.column("num_tokens_count").to_pylist(), strict=True)}


def tokenize_and_pack(dataset, tokenizer, block_size: int, num_proc: int = 1) -> PackedCorpus:
    """Tokenize ``dataset["text"]`` with `Dataset.map` (``num_proc`` processes), append eos to every document,
    and return a `PackedCorpus` that yields fixed-length blocks (pass it to `write_shards`)."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise DataError(f"block_size must be an integer ≥ 2 (tokens per training sequence), got {block_size!r}")
    if len(tokenizer) > np.iinfo(TOKEN_DTYPE).max:
        raise DataError(f"a tokenizer of {len(tokenizer)} tokens does not fit the uint32 shards")
    return PackedCorpus(tokenize_documents(dataset, tokenizer, num_proc=num_proc), block_size)
