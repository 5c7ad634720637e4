"""Tokenizers: byte-level BPE trained on the real sample corpus, and users' existing tokenizers loaded unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moai_lib.data import DataError, load_tokenizer, read_corpus, train_tokenizer

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    cache = tmp_path_factory.mktemp("hf_cache")
    corpus = read_corpus(SAMPLE / "train.jsonl", cache_dir=str(cache)).shuffle(seed=0).select(range(300))
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(corpus, vocab_size=1024, out_dir=out), out, read_corpus(SAMPLE / "valid.jsonl",
                                                                                     cache_dir=str(cache))


def test_trained_tokenizer_round_trips_every_language(trained):
    from transformers import AutoTokenizer

    _, out, valid = trained
    tokenizer = AutoTokenizer.from_pretrained(out)  # what the pipeline and `moai generate` load
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    seen = set()
    for text, lang in zip(valid["text"], valid["lang"], strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        seen.add(lang)
        # Multi-byte scripts compress too: merges were learnt for every language.
        assert len(ids) < len(text.encode("utf-8"))
    assert seen == {"en", "zh", "ko", "ja"}
    assert not list(out.parent.glob(".tokenizer.tmp-*"))  # the temporary directory was renamed away


def test_special_tokens_are_never_split(trained):
    tokenizer, _, _ = trained
    assert tokenizer("a<|endoftext|>b", add_special_tokens=False)["input_ids"][1] == tokenizer.eos_token_id


def test_vocab_size_too_small(trained):
    _, _, valid = trained
    with pytest.raises(DataError, match="vocab_size must be an integer ≥ 258"):
        train_tokenizer(valid, vocab_size=100)


def test_load_existing_tokenizer_unchanged_with_domain_tokens(trained, tmp_path):
    tokenizer, out, _ = trained
    loaded = load_tokenizer(out)
    text = "LibreOffice のユーザー補助ツール"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    extended = load_tokenizer(out, added_tokens=["<gene>", "<protein>", "<gene>"])
    assert len(extended) == len(tokenizer) + 2
    ids = extended("x <gene> y", add_special_tokens=False)["input_ids"]
    assert extended.convert_tokens_to_ids("<gene>") in ids
    assert extended.convert_tokens_to_ids("<gene>") >= len(tokenizer)  # appended, old ids unchanged
    assert extended(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_load_tokenizer_errors(trained, tmp_path):
    _, out, _ = trained
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)  # an empty directory
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    for f in out.iterdir():
        (no_eos / f.name).write_bytes(f.read_bytes())
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.update(eos_token=None, bos_token=None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="has no eos token"):
        load_tokenizer(no_eos)
