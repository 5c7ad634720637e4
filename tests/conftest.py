"""Shared fixtures: a real byte-level BPE tokenizer trained on the sample corpus, and a tiny saved model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"
TOKENIZER_VOCAB_SIZE = 512  # 256 byte symbols + 2 specials + 254 merges: trains in well under a second
TOKENIZER_TRAIN_DOCS = 200


@pytest.fixture(scope="session")
def sample_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 512, eos `<|endoftext|>`, pad `<|pad|>`) trained on the first 200
    documents of data/sample/train.jsonl, saved with `PreTrainedTokenizerFast.save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    with open(SAMPLE_DIR / "train.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, TOKENIZER_TRAIN_DOCS)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    path = tmp_path_factory.mktemp("sample_tokenizer")
    wrapped.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_tokenizer_dir) -> Path:
    """The `tiny` preset sized to the sample tokenizer, randomly initialised (seed 0), saved as safetensors."""
    from transformers import AutoTokenizer

    from moai_lib import MoaiMambaForCausalLM, get_mamba_config

    tokenizer = AutoTokenizer.from_pretrained(sample_tokenizer_dir)
    config = get_mamba_config("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (the S3 flow run, pretrain.sh under torchrun: minutes each) run only when asked for
    with `-m slow` (scripts/test.sh -m slow), so the default suite stays within ~10 minutes on 2 cores."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
