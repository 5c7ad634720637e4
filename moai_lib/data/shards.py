"""Token shards on disk: the writer (atomic: temp directory + rename) and a memory-mapped reader.

A data directory holds:

    index.json            format, block_size, dtype, vocab, eos, languages, per split its shard files
                          (name, blocks, sha256) and its per-block language file
    stats.json            per split: documents, tokens, blocks, dropped tokens, in total and per language
    train-00000.bin ...   raw uint32 tokens, num_blocks × block_size, row-major
    train.langs.npy       uint16 language code per block (index into "languages"), when the corpus has languages
    valid-00000.bin, valid.langs.npy
    tokenizer/            the tokenizer (save_pretrained), when one was given

Readers check each shard's size against the index (cheap) and, on request, its checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from .corpus import UNDETERMINED_LANG, DataError
from .packing import TOKEN_DTYPE
from .tokenizer import fsync_dir, make_temp_dir, replace_dir

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "moai-packed-v1"
LANG_DTYPE = np.uint16
DEFAULT_SHARD_TOKENS = 1 << 28  # 1 GiB of uint32 per shard file


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


class _SplitWriter:
    """Appends blocks to `{split}-NNNNN.bin` files, rolling over every `shard_blocks` blocks."""

    def __init__(self, directory: Path, split: str, block_size: int, shard_blocks: int):
        self.directory, self.split, self.block_size, self.shard_blocks = directory, split, block_size, shard_blocks
        self.shards: list[dict] = []
        self.langs: list[np.ndarray] = []
        self.lang_names: list[str | None] = []
        self.blocks_by_lang: dict[str | None, int] = {}
        self._file = None
        self._hash = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "num_blocks": 0, "sha256": None})
        self._in_shard = 0

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(num_blocks=self._in_shard, sha256=self._hash.hexdigest())
        self._file = None

    def write(self, lang: str | None, blocks: np.ndarray) -> None:
        if blocks.ndim != 2 or blocks.shape[1] != self.block_size:
            raise DataError(f"blocks of shape {blocks.shape} do not match block_size {self.block_size}")
        blocks = np.ascontiguousarray(blocks, dtype=TOKEN_DTYPE)
        self.blocks_by_lang[lang] = self.blocks_by_lang.get(lang, 0) + len(blocks)
        self.langs.append(np.full(len(blocks), self._code(lang), dtype=np.int64))
        start = 0
        while start < len(blocks):
            if self._file is None or self._in_shard == self.shard_blocks:
                if self._file is not None:
                    self._close_shard()
                self._open()
            take = min(len(blocks) - start, self.shard_blocks - self._in_shard)
            data = blocks[start:start + take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += take
            start += take

    def _code(self, lang: str | None) -> int:
        if lang not in self.lang_names:
            self.lang_names.append(lang)
        return self.lang_names.index(lang)

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()

    @property
    def num_blocks(self) -> int:
        return sum(s["num_blocks"] for s in self.shards)


def write_shards(
    out_dir: str | os.PathLike,
    splits: Mapping[str, Iterable[tuple[str | None, np.ndarray]]],
    block_size: int,
    tokenizer=None,
    vocab_size: int | None = None,
    eos_token_id: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    metadata: Mapping | None = None,
) -> dict:
    """Write each split's blocks (a `PackedCorpus`, or any iterable of ``(lang, blocks)``) as token shards.

    Everything goes to a temporary directory beside `out_dir`, which replaces `out_dir` only when complete:
    on any failure nothing is left behind and a previous `out_dir` is untouched.
    Returns the stats written to ``stats.json`` (per split and per language: documents, tokens, blocks).
    """
    if not splits:
        raise DataError("write_shards needs at least one split (e.g. train and valid)")
    if tokenizer is not None:
        vocab_size = len(tokenizer) if vocab_size is None else vocab_size
        eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if vocab_size is None:
        raise DataError("write_shards needs vocab_size (or a tokenizer)")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        writers, stats = {}, {}
        for split, source in splits.items():
            writer = _SplitWriter(tmp, split, block_size, max(1, shard_tokens // block_size))
            max_id = -1
            for lang, blocks in source:
                if blocks.size:
                    max_id = max(max_id, int(blocks.max()))
                writer.write(lang, blocks)
            writer.close()
            if writer.num_blocks == 0:
                raise DataError(f"split {split!r} has no full block of {block_size} tokens: use more text or a "
                                "smaller block_size")
            if max_id >= vocab_size:
                raise DataError(f"split {split!r} holds token id {max_id} ≥ vocab_size {vocab_size}")
            writers[split] = writer
            stats[split] = _split_stats(writer, source, block_size)
        languages = sorted({lang for w in writers.values() for lang in w.lang_names if lang is not None})
        if languages and any(None in w.lang_names for w in writers.values()):
            languages = sorted(set(languages) | {UNDETERMINED_LANG})  # a split without languages: "und"
        index = {"format": FORMAT, "block_size": block_size, "dtype": np.dtype(TOKEN_DTYPE).name,
                 "vocab_size": vocab_size, "eos_token_id": eos_token_id, "languages": languages, "splits": {},
                 "tokenizer": None, **({"metadata": dict(metadata)} if metadata else {})}
        for split, writer in writers.items():
            langs_file = None
            if languages:
                lookup = np.array([languages.index(UNDETERMINED_LANG if n is None else n)
                                   for n in writer.lang_names], dtype=np.int64)
                langs_file = f"{split}.langs.npy"
                codes = lookup[np.concatenate(writer.langs)].astype(LANG_DTYPE)
                with open(tmp / langs_file, "wb") as f:
                    np.save(f, codes)
                    f.flush()
                    os.fsync(f.fileno())
            index["splits"][split] = {"num_blocks": writer.num_blocks, "shards": writer.shards,
                                      "langs_file": langs_file}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            index["tokenizer"] = TOKENIZER_DIR
        _write_json(tmp / STATS_FILE, stats)
        _write_json(tmp / INDEX_FILE, index)  # last: a directory with an index is complete
        fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: %s", out, ", ".join(f"{s} {v['blocks']} blocks" for s, v in stats.items()))
    return stats


def _split_stats(writer: _SplitWriter, source, block_size: int) -> dict:
    docs = source.document_stats() if hasattr(source, "document_stats") else None
    langs = set(writer.blocks_by_lang) | (set(docs) if docs else set())
    by_lang = {}
    for lang in langs:
        blocks = writer.blocks_by_lang.get(lang, 0)
        entry = {"blocks": blocks, "packed_tokens": blocks * block_size}
        if docs is not None:
            d = docs.get(lang, {"documents": 0, "tokens": 0})
            entry = {"documents": d["documents"], "tokens": d["tokens"], **entry,
                     "dropped_tokens": d["tokens"] - blocks * block_size}
        by_lang[lang] = entry
    total = {key: sum(v[key] for v in by_lang.values()) for key in next(iter(by_lang.values()))}
    if all(lang is None for lang in by_lang):
        return total
    return {**total, "by_lang": {lang: by_lang[lang] for lang in sorted(by_lang)}}


def read_index(data_dir: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of a data directory; `DataError` when missing or not ours."""
    path = Path(data_dir) / INDEX_FILE
    if not Path(data_dir).is_dir():
        raise DataError(f"data directory {os.fspath(data_dir)!r} does not exist" if not Path(data_dir).exists()
                        else f"data path {os.fspath(data_dir)!r} is not a directory")
    if not path.is_file():
        raise DataError(f"{os.fspath(data_dir)!r} has no {INDEX_FILE}: not a packed data directory "
                        "(create one with `moai tokenize`)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable index ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} index")
    return index


def data_fingerprint(data_dir: str | os.PathLike) -> str:
    """sha256 of the index, which holds every shard's checksum: identifies the data a run trained on."""
    return hashlib.sha256((Path(data_dir) / INDEX_FILE).read_bytes()).hexdigest()


class PackedDataset:
    """Memory-mapped sequences of one split: item i is a uint32 array of `seq_len` tokens.

    `seq_len` (default: the block size) must divide the block size; each block then gives
    block_size // seq_len sequences, all of the block's language. `langs` holds each sequence's language code
    (index into `languages`), or None when the shards record no languages.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", seq_len: int | None = None,
                 verify: bool = False):
        self.data_dir = Path(data_dir)
        index = read_index(data_dir)
        if split not in index["splits"]:
            raise DataError(f"{self.data_dir}: no split {split!r} (has {', '.join(index['splits'])})")
        self.index = index
        self.split = split
        self.block_size = int(index["block_size"])
        self.seq_len = self.block_size if seq_len is None else int(seq_len)
        if self.seq_len < 2 or self.block_size % self.seq_len:
            raise DataError(f"max_length {self.seq_len} must be ≥ 2 and divide the shards' block_size "
                            f"{self.block_size}")
        self.pieces = self.block_size // self.seq_len
        self.vocab_size = int(index["vocab_size"])
        self.languages: list[str] = list(index["languages"])
        dtype = np.dtype(index["dtype"])
        info = index["splits"][split]
        self._maps, starts = [], [0]
        for shard in info["shards"]:
            path = self.data_dir / shard["file"]
            expected = shard["num_blocks"] * self.block_size * dtype.itemsize
            if not path.is_file():
                raise DataError(f"shard {path} is missing")
            if path.stat().st_size != expected:
                raise DataError(f"shard {path} has {path.stat().st_size} bytes, the index says {expected}: "
                                "the data directory is damaged; re-run `moai tokenize`")
            if verify and _sha256_file(path) != shard["sha256"]:
                raise DataError(f"shard {path} does not match its checksum in {INDEX_FILE}")
            self._maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["num_blocks"], self.block_size)))
            starts.append(starts[-1] + shard["num_blocks"])
        self._starts = np.array(starts)
        self.num_blocks = int(starts[-1])
        self.langs = None
        if info.get("langs_file"):
            block_langs = np.load(self.data_dir / info["langs_file"])
            if len(block_langs) != self.num_blocks:
                raise DataError(f"{self.data_dir / info['langs_file']}: {len(block_langs)} entries for "
                                f"{self.num_blocks} blocks")
            self.langs = np.repeat(block_langs.astype(np.int64), self.pieces)

    def __len__(self) -> int:
        return self.num_blocks * self.pieces

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        block, piece = divmod(i, self.pieces)
        shard = int(np.searchsorted(self._starts, block, side="right")) - 1
        row = self._maps[shard][block - self._starts[shard]]
        return row[piece * self.seq_len:(piece + 1) * self.seq_len]

    def batch(self, indices) -> torch.Tensor:
        """Sequences `indices` as a (B, seq_len) int64 tensor."""
        return torch.from_numpy(np.stack([self[int(i)] for i in indices]).astype(np.int64))

    def shard_tokens(self) -> list[np.ndarray]:
        """Each shard's tokens as a flat memory-mapped array (no copy)."""
        return [m.reshape(-1) for m in self._maps]

    def tokens(self) -> np.ndarray:
        """All tokens of the split, in order, as one uint32 array (a copy)."""
        return np.concatenate(self.shard_tokens()) if self._maps else np.zeros(0, TOKEN_DTYPE)


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def make_random_shards(out_dir: str | os.PathLike, vocab_size: int, block_size: int, train_blocks: int = 64,
                       valid_blocks: int = 8, seed: int = 0) -> dict:
    """Uniformly random tokens in [0, vocab_size): the dummy data of ``moai train --test``."""
    rng = np.random.default_rng(seed)
    splits = {name: [(None, rng.integers(0, vocab_size, (n, block_size), dtype=np.int64).astype(TOKEN_DTYPE))]
              for name, n in (("train", train_blocks), ("valid", valid_blocks))}
    return write_shards(out_dir, splits, block_size, vocab_size=vocab_size, metadata={"dummy": True})
