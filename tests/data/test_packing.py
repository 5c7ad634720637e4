"""Tokenize + pack + shards: blocks are exactly the token stream, shards round-trip, writes are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moai_lib.data import (
    DataError,
    PackedDataset,
    TokenizeParams,
    load_tokenizer,
    prepare_data,
    read_index,
    tokenize_and_pack,
    write_shards,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="module")
def tokenizer(sample_tokenizer_dir):
    return load_tokenizer(sample_tokenizer_dir)


@pytest.fixture(scope="module")
def docs():
    """60 sample documents of all four languages, as an in-memory dataset."""
    import datasets

    records = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text(encoding="utf-8").splitlines()[:60]]
    return datasets.Dataset.from_list([{"text": r["text"], "lang": r["lang"]} for r in records])


def expected_streams(docs, tokenizer) -> dict:
    """Per language: the concatenation of each document's tokens followed by eos, in corpus order."""
    streams: dict = {}
    for text, lang in zip(docs["text"], docs["lang"], strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        streams.setdefault(lang, []).extend(ids)
    return streams


def test_blocks_concatenate_back_to_the_token_stream(docs, tokenizer):
    block = 64
    packed = tokenize_and_pack(docs, tokenizer, block_size=block, num_proc=2)
    packed.batch_docs = 7  # several Arrow batches: the carry between batches must lose nothing
    got: dict = {}
    for lang, blocks in packed:
        assert blocks.dtype == np.uint32 and blocks.shape[1] == block
        got.setdefault(lang, []).append(blocks.reshape(-1))
    for lang, stream in expected_streams(docs, tokenizer).items():
        full = len(stream) // block * block
        np.testing.assert_array_equal(np.concatenate(got[lang]), np.array(stream[:full], dtype=np.uint32))
    stats = packed.document_stats()
    langs = list(docs["lang"])
    assert {k: v["documents"] for k, v in stats.items()} == {lang: langs.count(lang) for lang in set(langs)}


def test_single_process_equals_multiprocess_and_no_lang_is_one_stream(docs, tokenizer):
    no_lang = docs.remove_columns("lang")
    one = [b for _, b in tokenize_and_pack(no_lang, tokenizer, 32, num_proc=1)]
    two = [b for _, b in tokenize_and_pack(no_lang, tokenizer, 32, num_proc=2)]
    np.testing.assert_array_equal(np.concatenate(one), np.concatenate(two))
    stream = [t for s in [tokenizer(x, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                          for x in docs["text"]] for t in s]
    np.testing.assert_array_equal(np.concatenate(one).reshape(-1), stream[: len(stream) // 32 * 32])


def test_shards_round_trip_with_stats_and_languages(docs, tokenizer, tmp_path):
    split = docs.train_test_split(test_size=0.2, seed=0)
    packed = {"train": tokenize_and_pack(split["train"], tokenizer, 64),
              "valid": tokenize_and_pack(split["test"], tokenizer, 64)}
    stats = write_shards(tmp_path / "data", packed, 64, tokenizer=tokenizer, shard_tokens=64 * 50)
    index = read_index(tmp_path / "data")
    assert len(index["splits"]["train"]["shards"]) > 1  # rolled over to several shard files
    assert index["languages"] == ["en", "ja", "ko", "zh"]
    train = PackedDataset(tmp_path / "data", "train", verify=True)
    assert len(train) == stats["train"]["blocks"] == sum(v["blocks"] for v in stats["train"]["by_lang"].values())
    streams = expected_streams(split["train"], tokenizer)
    for code, lang in enumerate(train.languages):
        rows = np.stack([train[i] for i in range(len(train)) if train.langs[i] == code]).reshape(-1)
        np.testing.assert_array_equal(rows, streams[lang][: len(rows)])
        by_lang = stats["train"]["by_lang"][lang]
        assert by_lang["tokens"] == len(streams[lang])
        assert by_lang["dropped_tokens"] == len(streams[lang]) - len(rows) < 64
    assert stats["train"]["documents"] == len(split["train"])
    halves = PackedDataset(tmp_path / "data", "valid", seq_len=32)  # max_length 32 cuts each block in two
    whole = PackedDataset(tmp_path / "data", "valid")
    assert len(halves) == 2 * len(whole)
    np.testing.assert_array_equal(np.concatenate([halves[0], halves[1]]), whole[0])
    assert halves.batch([0, 3]).dtype.is_floating_point is False and tuple(halves.batch([0, 3]).shape) == (2, 32)
    assert (tmp_path / "data" / "tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(DataError, match="must be ≥ 2 and divide"):
        PackedDataset(tmp_path / "data", "valid", seq_len=48)


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    def exploding():
        yield None, np.zeros((4, 8), dtype=np.uint32)
        raise RuntimeError("disk full")

    good = {"train": [(None, np.ones((3, 8), dtype=np.uint32))]}
    write_shards(tmp_path / "out", good, 8, vocab_size=10)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        write_shards(tmp_path / "out", {"train": exploding()}, 8, vocab_size=10)
    with pytest.raises(DataError, match="holds token id 12 ≥ vocab_size 10"):
        write_shards(tmp_path / "out", {"train": [(None, np.full((1, 8), 12, dtype=np.uint32))]}, 8, vocab_size=10)
    with pytest.raises(RuntimeError, match="disk full"):
        write_shards(tmp_path / "fresh", {"train": exploding()}, 8, vocab_size=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs, no half-written "fresh"
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_damaged_shard_is_detected(tmp_path):
    write_shards(tmp_path / "d", {"train": [(None, np.ones((4, 8), dtype=np.uint32))]}, 8, vocab_size=10)
    shard = tmp_path / "d" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(DataError, match="has 124 bytes, the index says 128"):
        PackedDataset(tmp_path / "d")
    with pytest.raises(DataError, match="no index.json"):
        PackedDataset(tmp_path)


def test_prepare_data_holds_out_a_valid_split(tmp_path, sample_tokenizer_dir):
    from data_helpers import write_jsonl

    records = [json.loads(line) for line in (SAMPLE / "valid.jsonl").read_text(encoding="utf-8").splitlines()]
    write_jsonl(tmp_path / "corpus.jsonl", records)
    metrics = prepare_data(TokenizeParams(corpus=[str(tmp_path / "corpus.jsonl")], tokenizer=str(sample_tokenizer_dir),
                                          valid_fraction=0.2, block_size=32, cache_dir=str(tmp_path / "cache")),
                           tmp_path / "packed")
    assert metrics["train_documents"] + metrics["valid_documents"] == len(records)
    assert metrics["valid_documents"] == round(0.2 * len(records))
    assert metrics["train_tokens"] == sum(metrics[f"train_tokens_{lang}"] for lang in ("en", "ja", "ko", "zh"))
    stats = json.loads((tmp_path / "packed" / "stats.json").read_text())
    assert stats["valid"]["blocks"] == metrics["valid_blocks"] > 0
    with pytest.raises(DataError, match="exactly one of vocab_size"):
        TokenizeParams(corpus=["x"], vocab_size=512, tokenizer="t")


def test_documents_without_language_are_packed_as_und(tokenizer):
    import datasets

    docs = datasets.Dataset.from_list([{"text": "hello there " * 20, "lang": "en"},
                                       {"text": "no language code " * 20, "lang": None}])
    packed = tokenize_and_pack(docs, tokenizer, 16)
    assert {lang for lang, _ in packed} == {"en", "und"}
    assert set(packed.document_stats()) == {"en", "und"}
