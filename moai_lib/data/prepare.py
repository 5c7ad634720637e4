"""The tokenize stage: corpus → tokenizer → packed train/valid shards, as one function of typed params."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .corpus import TEXT_UNITS, DataError, read_corpus
from .packing import tokenize_and_pack
from .shards import write_shards
from .tokenizer import DEFAULT_SPECIAL_TOKENS, load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class TokenizeParams:
    """Parameters of the tokenize stage.

    Args:
        corpus: training corpus files, directories or globs (JSON Lines, text, Parquet; see `read_corpus`).
        valid_corpus: validation corpus; when None, `valid_fraction` of the corpus documents is held out.
        valid_fraction: share of documents held out for validation (seeded split) without `valid_corpus`.
        vocab_size: train a byte-level BPE of this size on the training split ...
        tokenizer: ... or load this existing Hugging Face tokenizer directory unchanged (exactly one of the two).
        added_tokens: domain tokens appended to a loaded tokenizer (never split).
        special_tokens: for a trained tokenizer: eos (= bos), pad, then any others.
        block_size: tokens per packed training block; must not exceed the model's max_position_embeddings.
        num_proc: processes for tokenization (`Dataset.map`).
        text_field / lang_field: record fields of the text and of the language code.
        text_unit: how plain-text files split into documents: line, paragraph or document.
        seed: seed of the train/valid document split.
        cache_dir: the `datasets` cache (None: HF_DATASETS_CACHE).
    """

    corpus: list[str]
    valid_corpus: list[str] | None = None
    valid_fraction: float = 0.05
    vocab_size: int | None = None
    tokenizer: str | None = None
    added_tokens: list[str] = field(default_factory=list)
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    block_size: int = 1024
    num_proc: int = 1
    text_field: str = "text"
    lang_field: str = "lang"
    text_unit: str = "paragraph"
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.corpus, str | os.PathLike):
            self.corpus = [os.fspath(self.corpus)]
        if isinstance(self.valid_corpus, str | os.PathLike):
            self.valid_corpus = [os.fspath(self.valid_corpus)]
        if not self.corpus:
            raise DataError("corpus: give at least one file, directory or glob")
        if (self.vocab_size is None) == (self.tokenizer is None):
            raise DataError("give exactly one of vocab_size (train a new tokenizer) or tokenizer (an existing "
                            "tokenizer directory)")
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int)
                                            or self.vocab_size <= 256 + len(self.special_tokens)):
            raise DataError(f"vocab_size must be an integer > {256 + len(self.special_tokens)} (256 bytes + special "
                            f"tokens), got {self.vocab_size!r}")
        if self.added_tokens and self.tokenizer is None:
            raise DataError("added_tokens extend an existing tokenizer: use them with tokenizer, not vocab_size")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise DataError(f"block_size must be an integer ≥ 2, got {self.block_size!r}")
        if isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise DataError(f"num_proc must be an integer ≥ 1, got {self.num_proc!r}")
        if self.valid_corpus is None and not (0 < self.valid_fraction < 1):
            raise DataError(f"valid_fraction must be in (0, 1) when no valid_corpus is given, "
                            f"got {self.valid_fraction!r}")
        if self.text_unit not in TEXT_UNITS:
            raise DataError(f"text_unit must be one of {', '.join(TEXT_UNITS)}, got {self.text_unit!r}")


def prepare_data(params: TokenizeParams, out_dir: str | os.PathLike) -> dict:
    """Read the corpus, train or load the tokenizer, tokenize, pack and write shards to `out_dir` atomically.

    Returns metrics: documents, tokens and blocks per split (and per language), vocab size, block size.
    """
    read = dict(text_field=params.text_field, lang_field=params.lang_field, text_unit=params.text_unit,
                cache_dir=params.cache_dir)
    if params.tokenizer is not None:  # fail on a bad tokenizer before reading a large corpus
        tokenizer = load_tokenizer(params.tokenizer, params.added_tokens)
    corpus = read_corpus(params.corpus, **read)
    if params.valid_corpus is not None:
        train, valid = corpus, read_corpus(params.valid_corpus, **read)
    else:
        if len(corpus) < 2:
            raise DataError(f"the corpus has {len(corpus)} document(s): too few to hold out valid_fraction; "
                            "give valid_corpus")
        split = corpus.train_test_split(test_size=params.valid_fraction, seed=params.seed, shuffle=True)
        train, valid = split["train"], split["test"]
    if params.tokenizer is None:
        tokenizer = train_tokenizer(train, params.vocab_size, params.special_tokens)
    packed = {name: tokenize_and_pack(ds, tokenizer, params.block_size, num_proc=params.num_proc)
              for name, ds in (("train", train), ("valid", valid))}
    stats = write_shards(out_dir, packed, params.block_size, tokenizer=tokenizer,
                         metadata={"tokenize_params": asdict(params)})
    metrics = {"vocab_size": len(tokenizer), "block_size": params.block_size}
    for split, s in stats.items():
        for key in ("documents", "tokens", "blocks", "dropped_tokens"):
            metrics[f"{split}_{key}"] = s[key]
        for lang, ls in s.get("by_lang", {}).items():
            metrics[f"{split}_tokens_{lang}"] = ls["tokens"]
    logger.info("tokenize: %s", metrics)
    return metrics


def tokenizer_dir(data_dir: str | os.PathLike) -> Path | None:
    """The tokenizer saved with the shards, if any."""
    path = Path(data_dir) / "tokenizer"
    return path if path.is_dir() else None
