"""Fine-tuning from a saved model, and domain tokens added to an existing tokenizer (embeddings resized)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import load_weights

from moai_lib.data import load_tokenizer, tokenize_and_pack, write_shards
from moai_lib.train import TrainConfigError, TrainParams, pretrain

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
PARAMS = dict(batch_size=4, max_length=32, max_steps=3, learning_rate=1e-3, warmup_steps=0, eval_batches=2,
              progress=False)


def test_finetune_from_model_path(tmp_path, tiny_model_dir, sample_shards):
    metrics = pretrain(TrainParams(**PARAMS), str(tiny_model_dir), sample_shards, tmp_path)
    before, after = load_weights(tiny_model_dir), load_weights(tmp_path / "model")
    assert metrics["completed"] and before.keys() == after.keys()
    for name in before:  # started from the saved weights: a few small steps move them only a little
        assert (after[name] - before[name]).abs().max() < 0.05, name
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.fixture(scope="module")
def domain_shards(tmp_path_factory, sample_tokenizer_dir):
    """Valid-split documents with three domain tokens sprinkled in, tokenized by the extended tokenizer."""
    import datasets

    tokenizer = load_tokenizer(sample_tokenizer_dir, added_tokens=["<gene>", "<protein>", "<cell>"])
    records = [json.loads(line) for line in (SAMPLE / "valid.jsonl").read_text(encoding="utf-8").splitlines()]
    docs = datasets.Dataset.from_list([{"text": r["text"].replace(" the ", " <gene> the <cell> "), "lang": r["lang"]}
                                       for r in records])
    split = docs.train_test_split(test_size=0.2, seed=0)
    out = tmp_path_factory.mktemp("domain") / "packed"
    write_shards(out, {"train": tokenize_and_pack(split["train"], tokenizer, 64),
                       "valid": tokenize_and_pack(split["test"], tokenizer, 64)}, 64, tokenizer=tokenizer)
    return out, tokenizer


def test_added_domain_tokens_resize_the_embeddings(tmp_path, tiny_model_dir, domain_shards):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, tokenizer = domain_shards
    assert len(tokenizer) == 515
    with pytest.raises(TrainConfigError, match="has 515 tokens but the model's vocab_size is 512.*resize_token_embed"):
        pretrain(TrainParams(**PARAMS), str(tiny_model_dir), data, tmp_path)
    metrics = pretrain(TrainParams(**PARAMS, resize_token_embeddings=True), str(tiny_model_dir), data, tmp_path)
    assert metrics["completed"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    saved_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size == len(saved_tokenizer) == 515
    ids = saved_tokenizer("a <gene> b", return_tensors="pt")["input_ids"]
    assert saved_tokenizer.convert_tokens_to_ids("<gene>") in ids[0].tolist()
    assert model(input_ids=ids, labels=ids).loss.isfinite()
    old = load_weights(tiny_model_dir)["backbone.embedding.weight"]
    new = model.get_input_embeddings().weight.detach()
    assert (new[:512] - old[:512]).abs().max() < 0.05  # the old rows were kept (and fine-tuned a little)
