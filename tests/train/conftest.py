"""Fixtures for the training tests: the sample corpus packed with the session's BPE tokenizer, a tiny config."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
BLOCK_SIZE = 128


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, sample_tokenizer_dir) -> Path:
    """data/sample (train and valid, four languages) tokenized with the 512-token sample BPE and packed into
    blocks of 128 tokens: ~14K train blocks, ~900 valid blocks, languages recorded per block."""
    import datasets

    from moai_lib.data import load_tokenizer, read_corpus, tokenize_and_pack, write_shards

    datasets.disable_progress_bars()
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    tokenizer = load_tokenizer(sample_tokenizer_dir)
    packed = {split: tokenize_and_pack(read_corpus(SAMPLE / f"{split}.jsonl", cache_dir=cache), tokenizer, BLOCK_SIZE)
              for split in ("train", "valid")}
    out = tmp_path_factory.mktemp("shards") / "sample"
    write_shards(out, packed, BLOCK_SIZE, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def tiny_config(sample_tokenizer_dir):
    from transformers import AutoTokenizer

    from moai_lib import get_mamba_config

    tokenizer = AutoTokenizer.from_pretrained(sample_tokenizer_dir)
    return get_mamba_config("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)

