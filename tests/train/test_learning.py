"""The tiny model learns the sample corpus: validation perplexity ends far below the unigram perplexity."""

from __future__ import annotations

import json
import math

import numpy as np

from moai_lib.data import PackedDataset
from moai_lib.train import TrainParams, pretrain, unigram_perplexity


def test_unigram_perplexity_matches_a_direct_count(sample_shards):
    train = PackedDataset(sample_shards, "train", seq_len=64)
    valid = PackedDataset(sample_shards, "valid", seq_len=64)
    counts = np.bincount(train.tokens().astype(np.int64), minlength=train.vocab_size)
    p = (counts + 1) / (counts.sum() + train.vocab_size)
    targets = np.concatenate([valid[i][1:] for i in range(len(valid))])
    assert math.isclose(unigram_perplexity(train, valid), math.exp(-np.log(p[targets]).mean()), rel_tol=1e-9)


def test_tiny_model_learns_the_sample_corpus(tmp_path, sample_shards, tiny_config, sample_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 51K tokens (~10 s on one core); the model sees under 3% of the training split.
    params = TrainParams(batch_size=16, max_length=64, max_steps=50, learning_rate=3e-2, warmup_steps=5,
                         weight_decay=0.01, eval_batches=8, eval_batch_size=32, eval_every=25, progress=False)
    metrics = pretrain(params, tiny_config, sample_shards, tmp_path / "run")

    assert metrics["completed"] and metrics["step"] == 50
    unigram = metrics["valid_unigram_ppl"]
    assert 150 < unigram < 400  # a 512-token BPE on four languages
    assert metrics["val_ppl"] < 0.35 * unigram, (metrics["val_ppl"], unigram)  # measured: ~0.23
    for lang in ("en", "ja", "ko", "zh"):
        assert metrics[f"val_ppl_{lang}"] < 0.45 * unigram
    evals = [h for h in metrics["history"] if "val_loss" in h]
    assert [h["step"] for h in evals] == [25, 50] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert metrics["tokens_seen"] == 50 * 16 * 64 and metrics["tokens_per_second"] > 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_ppl"] == metrics["val_ppl"]

    # The saved model is a plain HF directory: safetensors weights and the data's tokenizer.
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(sample_tokenizer_dir))
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids, labels=ids).loss.item() > 0
